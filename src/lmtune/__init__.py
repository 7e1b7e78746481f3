"""lmtune: LoRA/QLoRA fine-tuning of causal LMs for text classification, with Lightning and Hydra.

Packages in layers, each importing only those below it (tests/test_layers.py checks it), bottom to top:
core, arxiv, data, model, artifacts, evaluation, training, commands. The entry points are src/*.py.
"""
