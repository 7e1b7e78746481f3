"""What tests share besides conftest: a fake arXiv API, a CLI driver, chat-model families, a W&B run reader."""
