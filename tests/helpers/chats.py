"""Conversations for the generate kind's tests: good ones whose answers name their row and turn, and one bad
row of each kind the data layer skips."""

from __future__ import annotations

import json


def chat(i: int, turns: int = 3) -> list[dict]:
    """A conversation of `turns` exchanges, each answer naming its row and turn."""
    messages = [{"role": "system", "content": "Answer in a few words."}]
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Question {t} of conversation {i}: what is {i} plus {t}?"},
            {"role": "assistant", "content": f"It is {i + t}, row {i} turn {t}."},
        ]
    return messages


BAD_ROWS = {
    "messages is not a JSON list": "not json",
    "messages is not a non-empty list": [],
    "a message without a role of system, user or assistant": [{"role": "tool", "content": "x"}],
    "a message with empty or non-string content": [{"role": "user", "content": " "}],
    "roles out of order (system first, then user and assistant alternating)": [
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Hello?"},
    ],
    "no assistant turn": [{"role": "user", "content": "Anyone?"}],
}


def write_chats(path, n: int = 40) -> list[dict]:
    """`n` good conversations and one bad row of each kind, as JSONL."""
    rows = [{"id": f"c{i}", "messages": chat(i, 1 + i % 3)} for i in range(n)]
    rows += [{"id": f"bad{k}", "messages": value} for k, value in enumerate(BAD_ROWS.values())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
