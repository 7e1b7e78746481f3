"""Scoring a model on labelled rows: the predictor, metrics, rank and generate modes, outputs, the report."""
