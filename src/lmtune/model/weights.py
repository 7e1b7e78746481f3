"""Whether saved trainable weights (a checkpoint's) fit a model: one line naming the first weight that does not."""

from __future__ import annotations

from lmtune.core.errors import UserError


def check_weights_fit(weights: dict, params: dict, trainable: set[str], where: str, fix: str) -> None:
    """`weights` (a checkpoint's) load into a model with these `params` (name -> tensor): every trainable weight
    present, none unknown, every shape equal; else one line saying which weight differs and `fix`."""
    missing = sorted(trainable - set(weights))
    unknown = sorted(set(weights) - set(params))
    wrong = [(n, tuple(w.shape), tuple(params[n].shape)) for n, w in weights.items() if n in params]
    wrong = [(n, a, b) for n, a, b in wrong if a != b]
    if wrong:
        name, theirs, ours = wrong[0]
        problem = f"{len(wrong)} weights have other shapes (first: {name} is {list(theirs)} there, {list(ours)} here)"
    elif missing or unknown:
        first = (missing or unknown)[0]
        problem = f"{len(missing)} trainable weights missing and {len(unknown)} unknown (first: {first})"
    else:
        return
    raise UserError(f"{where}: written for another model or adapter: {problem}. {fix}")
