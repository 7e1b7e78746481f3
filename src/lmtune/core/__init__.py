"""Plumbing every package may use: errors, atomic writes, progress, digests, redaction, the entry points' checks."""
