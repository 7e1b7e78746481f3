"""Errors a user can fix: they are shown as one clear message (no traceback) by the entry points."""


class UserError(ValueError):
    """Bad input or settings; the message names the file, line or field and the fix."""


class DataError(UserError):
    """Input data that cannot be used; the message names the file, line or field and the fix."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to `limit` characters: what
    a one-line error quotes of a library's exception."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
