"""The task kinds, each a plug-in package (`training/kinds.py` finds them by name): `classify` answers with one
label of a label set and is scored by ranking the labels; `generate` writes free-form answers and whole
conversations."""
