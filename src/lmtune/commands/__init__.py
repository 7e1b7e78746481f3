"""The work behind the entry points eval, baseline, predict and serve (train and merge live in their packages)."""
