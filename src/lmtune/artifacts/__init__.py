"""What a run leaves to keep: checkpoints (read and written), the export format, its model card, merging."""
