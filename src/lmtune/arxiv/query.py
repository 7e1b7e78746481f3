"""The API's `search_query` for categories and a submission date range, checked before any request."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

_CATEGORY_RE = re.compile(r"^[a-z]+(?:-[a-z]+)*(?:\.[A-Za-z]+(?:-[A-Za-z]+)*)?$")


def _as_date(value: dt.date | str, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"{name} must be a date or 'YYYY-MM-DD', got {value!r}")


def date_range(date_from, date_to) -> tuple[dt.date, dt.date] | None:
    """Open ends are filled with bounds that cover all of arXiv (it started in 1991)."""
    if date_from is None and date_to is None:
        return None
    start = _as_date(date_from, "date_from") if date_from is not None else dt.date(1991, 1, 1)
    end = _as_date(date_to, "date_to") if date_to is not None else dt.date(2099, 12, 31)
    if start > end:
        raise ValueError(f"date_from {start} is after date_to {end}")
    return start, end


def search_query(
    categories: Iterable[str], date_from: dt.date | str | None = None, date_to: dt.date | str | None = None
) -> str:
    """The API's `search_query`, e.g. `(cat:cs.CL OR cat:cs.CV) AND submittedDate:[202401010000 TO 202412312359]`.

    Category names are validated so a typo or stray quote fails here, not as an empty result later.
    """
    cats = list(dict.fromkeys(c.strip() for c in ([categories] if isinstance(categories, str) else categories)))
    if not cats:
        raise ValueError("search_query needs at least one category, e.g. ['cs.CL']")
    bad = [c for c in cats if not _CATEGORY_RE.match(c)]
    if bad:
        raise ValueError(f"not arXiv category names: {bad}; expected e.g. 'cs.CL', 'math.GT', 'hep-th'")
    query = " OR ".join(f"cat:{c}" for c in cats)
    if len(cats) > 1:
        query = f"({query})"
    dates = date_range(date_from, date_to)
    if dates:
        query += f" AND submittedDate:[{dates[0]:%Y%m%d}0000 TO {dates[1]:%Y%m%d}2359]"
    return query
