"""The arXiv API's answers: an Atom feed parsed into records, its error entries and cut-off bodies as errors.

Records are in the JSONL schema training data is read in: `id`, `title`, `abstract`, `categories`,
`primary_category`, `published`."""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from lmtune.arxiv.ids import normalize_id
from lmtune.core.errors import UserError

log = logging.getLogger(__name__)

NS = {
    "atom": "http://www.w3.org/2005/Atom",
    "opensearch": "http://a9.com/-/spec/opensearch/1.1/",
    "arxiv": "http://arxiv.org/schemas/atom",
}
ERROR_ID_PREFIX = "http://arxiv.org/api/errors"
COLUMNS = ("title", "abstract")  # the text a paper gives a prompt
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}")


class ArxivApiError(UserError):
    """The arXiv API could not be reached, or answered with an error or an unusable document.

    `retryable` is True for failures that may go away on their own (a body cut off mid-document,
    a response that is not an Atom feed); `ArxivClient.get` retries those.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ArxivRecord:
    """One paper in the JSONL schema the training data loader expects."""

    id: str
    title: str
    abstract: str
    categories: list[str]
    primary_category: str
    published: str  # YYYY-MM-DD

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "abstract": self.abstract,
            "categories": list(self.categories),
            "primary_category": self.primary_category,
            "published": self.published,
        }


@dataclass
class FeedPage:
    """One parsed API answer: its entries and the opensearch paging numbers."""

    entries: list[ArxivRecord]
    total_results: int
    start_index: int
    items_per_page: int
    skipped: int = 0  # entries that lacked a usable id/title/abstract/date (logged)


def _collapse(text: str | None) -> str:
    """Titles and abstracts arrive hard-wrapped and indented; training wants single spaces."""
    return " ".join((text or "").split())


def _int(root: ET.Element, path: str) -> int:
    node = root.find(path, NS)
    if node is None or not (node.text or "").strip():
        raise ArxivApiError(f"arXiv answer lacks <{path}>; not an API feed", retryable=True)
    try:
        return int(node.text.strip())
    except ValueError:
        raise ArxivApiError(f"arXiv answer has a non-integer <{path}>: {node.text!r}", retryable=True) from None


def _parse_entry(entry: ET.Element) -> ArxivRecord:
    """Raise ValueError (with the reason) for an entry that cannot become a training record."""
    raw_id = entry.findtext("atom:id", default="", namespaces=NS).strip()
    record_id = normalize_id(raw_id)
    title = _collapse(entry.findtext("atom:title", namespaces=NS))
    abstract = _collapse(entry.findtext("atom:summary", namespaces=NS))
    published = entry.findtext("atom:published", default="", namespaces=NS).strip()
    if not title or not abstract:
        raise ValueError(f"entry {raw_id} has an empty title or summary")
    if not _DATE_RE.match(published):
        raise ValueError(f"entry {raw_id} has no usable <published> date: {published!r}")

    primary_node = entry.find("arxiv:primary_category", NS)
    primary = (primary_node.get("term", "") if primary_node is not None else "").strip()
    feed_order = [c.get("term", "").strip() for c in entry.findall("atom:category", NS)]
    # The primary category is the label; it goes first even when another sorts before it.
    categories = list(dict.fromkeys(c for c in [primary, *feed_order] if c))
    return ArxivRecord(
        id=record_id,
        title=title,
        abstract=abstract,
        categories=categories,
        primary_category=primary or (categories[0] if categories else ""),
        published=published[:10],
    )


def parse_feed(xml_bytes: bytes) -> FeedPage:
    """Parse one Atom answer of the API.

    An error entry (id http://arxiv.org/api/errors#...) raises a non-retryable `ArxivApiError` with the
    API's message; a body that is not well-formed XML (typically cut off mid-transfer) or not an Atom
    feed raises a retryable one. Single entries that cannot be used are skipped and logged, so one odd
    paper does not stall a long collection run at the same page forever.
    """
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise ArxivApiError(f"arXiv answer is not well-formed XML (truncated?): {exc}", retryable=True) from None
    if root.tag != f"{{{NS['atom']}}}feed":
        raise ArxivApiError(f"arXiv answer is not an Atom feed (root element {root.tag!r})", retryable=True)

    entries = root.findall("atom:entry", NS)
    for entry in entries:
        entry_id = entry.findtext("atom:id", default="", namespaces=NS).strip()
        if entry_id.startswith(ERROR_ID_PREFIX):
            message = _collapse(entry.findtext("atom:summary", namespaces=NS)) or entry_id
            raise ArxivApiError(f"arXiv API error: {message}")

    records, skipped = [], 0
    for entry in entries:
        try:
            records.append(_parse_entry(entry))
        except ValueError as exc:
            skipped += 1
            log.warning("skipping unusable arXiv entry: %s", exc)
    return FeedPage(
        entries=records,
        total_results=_int(root, "opensearch:totalResults"),
        start_index=_int(root, "opensearch:startIndex"),
        items_per_page=_int(root, "opensearch:itemsPerPage"),
        skipped=skipped,
    )
