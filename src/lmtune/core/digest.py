"""Stable short hashes of JSON-able values: the keys of every cache (prepared data, arXiv fetches, zero-shot
scores), so the same inputs find the same files."""

from __future__ import annotations

import hashlib
import json


def json_digest(value, length: int = 20) -> str:
    """A stable short hash of a JSON-able value (dict keys sorted), for cache keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]
