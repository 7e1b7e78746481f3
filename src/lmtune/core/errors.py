"""Errors a user can fix: they are shown as one clear message (no traceback) by the entry points."""


class UserError(ValueError):
    """Bad input or settings; the message names the file, line or field and the fix."""


class DataError(UserError):
    """Input data that cannot be used; the message names the file, line or field and the fix."""
