"""Task kinds as plug-ins: what differs between a classifier and a generator (the module's evaluation, the
end-of-training report, what the export and model card record) lives in one package per kind; training finds the
kind by its name and imports none.

A kind is an object with `name` and `module(...)`, `callbacks(cfg)`, `report` (None for none),
`export_task(...)`, `card_inputs(...)` (see `lmtune.tasks.classify` for the reference). The built-in kinds are
`lmtune.tasks.<name>.KIND`; another package adds one with an entry point in the group `lmtune.tasks`
(`mykind = "mypackage.kind:KIND"`).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from lmtune.core.errors import UserError

BUILT_IN = ("classify", "generate")


def task_kind(name: str):
    """The kind called `name`; an unknown name is one line naming the known ones."""
    if name in BUILT_IN:
        return importlib.import_module(f"lmtune.tasks.{name}").KIND
    for point in entry_points(group="lmtune.tasks"):
        if point.name == name:
            return point.load()
    known = [*BUILT_IN, *(p.name for p in entry_points(group="lmtune.tasks") if p.name not in BUILT_IN)]
    raise UserError(f"task kind {name!r} is not known; use one of {', '.join(known)}.")
