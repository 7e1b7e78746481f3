"""What drives a run: the config made ready, instantiation, loggers, callbacks, throughput, `train()`."""
