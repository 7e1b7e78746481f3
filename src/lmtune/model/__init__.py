"""The model: loading, adapters, the loss, rank scoring, the precision it computes in, the LightningModule."""
