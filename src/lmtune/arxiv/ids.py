"""arXiv ids: every common spelling of one (versions, `arXiv:`, abs/pdf URLs, old-style) to the one canonical id."""

from __future__ import annotations

import re

_NEW_ID = r"(?P<new>\d{2}(?:0[1-9]|1[0-2])\.\d{4,5})"
_OLD_ID = r"(?P<archive>[a-z]+(?:-[a-z]+)*)(?:\.[A-Za-z]+(?:-[A-Za-z]+)*)?/(?P<number>\d{2}(?:0[1-9]|1[0-2])\d{3})"
_ID_RE = re.compile(
    r"^(?:arxiv:|https?://(?:www\.|export\.)?arxiv\.org/(?:abs|pdf)/)?"
    rf"(?:{_NEW_ID}|{_OLD_ID})(?:v\d+)?(?:\.pdf)?/?$",
    re.IGNORECASE,
)


def normalize_id(text: str) -> str:
    """The arXiv id without version ("2401.01234", "math/0301234") from any common spelling of it.

    Versions are dropped because the same paper must dedupe to one record whatever version a page
    shows; an old-style subject class ("math.GT/0301234") is dropped too, since arXiv's canonical id
    is "math/0301234".
    """
    if not isinstance(text, str):
        raise ValueError(f"arXiv id must be a string, got {type(text).__name__}: {text!r}")
    match = _ID_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"not an arXiv id: {text!r}. Expected e.g. '2401.01234', '2401.01234v2', 'arXiv:2401.01234', "
            f"'https://arxiv.org/abs/2401.01234v3' or old-style 'math/0301234'."
        )
    if match["new"]:
        return match["new"]
    return f"{match['archive'].lower()}/{match['number']}"
