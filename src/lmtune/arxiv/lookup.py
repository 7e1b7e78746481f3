"""Papers by arXiv id: the text predict and serve fetch when given an id (`arxiv_id=`, a file's `id` column,
`{"arxiv_id": ...}`) instead of the text, for a model whose prompt reads only what a paper gives."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lmtune.arxiv.client import ArxivClient
from lmtune.arxiv.feed import COLUMNS, ArxivApiError, ArxivRecord
from lmtune.arxiv.ids import normalize_id
from lmtune.core.errors import UserError


def fetch_by_ids(client: ArxivClient, ids: Iterable[str], chunk_size: int = 100) -> dict[str, ArxivRecord]:
    """The records of the given papers, keyed by normalized id; ids arXiv does not know are absent.

    Any common spelling of an id is accepted (versions, `arXiv:` prefixes, abs/pdf URLs); a string that is
    not an arXiv id raises ValueError before any request is made.
    """
    wanted = list(dict.fromkeys(normalize_id(i) for i in ids))
    found: dict[str, ArxivRecord] = {}
    for i in range(0, len(wanted), chunk_size):
        chunk = wanted[i : i + chunk_size]
        page = client.get({"id_list": ",".join(chunk), "start": 0, "max_results": len(chunk)})
        found.update((r.id, r) for r in page.entries if r.id in chunk)
    return found


def fetchable(columns: Iterable[str]) -> bool:
    """Whether a prompt over `columns` can be filled from a paper fetched by id."""
    return set(columns) <= set(COLUMNS)


def check_fetchable(columns: list[str], what: str) -> None:
    if not fetchable(columns):
        raise UserError(
            f"{what} fetches a paper's title and abstract, but this model's prompt reads {', '.join(columns)}; "
            f"give the text instead: input=<file with those columns> or row='{{{columns[0]}: ...}}'."
        )


def canonical_id(text, where: str) -> str:
    """`normalize_id`, its refusal a UserError that names `where` the id came from."""
    try:
        return normalize_id(str(text))
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def fetch_texts(settings: Mapping, ids: list[str]) -> dict[str, dict[str, str]]:
    """The prompt's columns of each paper arXiv knows, by its id; `settings`: the `arxiv` config (client)."""
    records = fetch_by_ids(ArxivClient(**settings), ids)
    return {i: {"title": r.title, "abstract": r.abstract} for i, r in records.items()}


def texts_by_id(settings: Mapping, raw_ids: list, columns: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(id, text) of each of `arxiv_id=2401.01234` (or a list), in order: every id must exist on arXiv."""
    check_fetchable(columns, "arxiv_id=")
    ids = [canonical_id(i, f"arxiv_id={i}") for i in raw_ids]
    found = fetch_texts(settings, ids)
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise UserError(
            f"arXiv has no paper with id {', '.join(unknown)} (asked {settings.get('base_url')}); check the id, "
            f"or give the text with title=... abstract=..."
        )
    return [(i, found[i]) for i in ids]


def request_by_id(settings: Mapping):
    """For serve: a request's `arxiv_id` -> (HTTP status, `{"fields", "id"}` of the paper or the one-line reason).
    Blocking (it asks the API): run it in a thread."""

    def check(raw_id) -> tuple[int, dict | str]:
        try:
            paper_id = normalize_id(str(raw_id))
        except ValueError as e:
            return 422, f"arxiv_id: {e}"
        try:
            found = fetch_texts(settings, [paper_id])
        except ArxivApiError as e:
            return 502, f"the arXiv API did not answer ({e}); send the title and abstract instead"
        if paper_id not in found:
            return 404, f"arXiv has no paper with id {paper_id}"
        return 200, {"fields": found[paper_id], "id": paper_id}

    return check


def verbatim_ids(overrides: list[str]) -> str | list[str] | None:
    """`arxiv_id` exactly as typed: Hydra reads `arxiv_id=2401.01230` as the float 2401.0123, losing a digit."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == "arxiv_id":
            value = value.strip()
            if value.startswith("[") and value.endswith("]"):
                return [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
            return value.strip("'\"")
    return None
