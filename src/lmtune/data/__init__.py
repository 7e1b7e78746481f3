"""Labelled text to batches: records, sources, prompt formatting, prepared examples, the data module."""
