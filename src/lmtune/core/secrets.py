"""Secrets kept out of what gets shared: logger hyperparameters, an export's config.yaml, W&B run names."""

from __future__ import annotations

import re

# Keys whose values never reach a logger: API keys, passwords, secrets, and auth tokens (not `pad_token` and the
# like, which name vocabulary items). Matched on the last part of the key, case-insensitive, `-` read as `_`.
SECRET_KEY = re.compile(
    r"(^|_)(api_?key|access_?key|secrets?|password|passwd|private_key|credentials?|connection_?string|dsn)($|_)"
    r"|^((access|auth|api|hf|hub|bearer|refresh|session|wandb|github|sas|id|client|oauth|security)_)?token$"
)
REDACTED = "***REDACTED***"
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)", re.IGNORECASE)
# a URL's query parameters that carry credentials: ?token=, access_token=, sig= (Azure SAS), X-Amz-Signature=, key=
_URL_QUERY_SECRET = re.compile(
    r"(?P<head>[?&][\w.-]*?(?:token|sig|signature|key|password|secret|credential)[\w.-]*=)[^&#\s]+", re.IGNORECASE
)


def is_secret_key(key) -> bool:
    return bool(SECRET_KEY.search(str(key).rsplit(".", 1)[-1].lower().replace("-", "_")))


def redact_secrets(obj):
    """A copy of `obj` (dicts, lists, strings) with secret-looking keys' values and passwords in URLs replaced."""
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_key(k) and v is not None else redact_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_secrets(v) for v in obj)
    if isinstance(obj, str):
        return _URL_QUERY_SECRET.sub(rf"\g<head>{REDACTED}", _URL_PASSWORD.sub(rf"\g<head>{REDACTED}", obj))
    return obj


def redact_override(override: str) -> str:
    """`+secrets.api_key=abc` -> `+secrets.api_key=***REDACTED***`; other overrides as redact_secrets leaves them."""
    key, sep, value = override.partition("=")
    if sep and is_secret_key(key.lstrip("+~")):
        return f"{key}={REDACTED}"
    return redact_secrets(override)
