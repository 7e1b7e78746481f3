"""How a classifier's rank scores become probabilities and label sets a user can act on, fitted on the validation
split after training, kept in the export (`calibration.json`) and applied wherever the export answers (eval,
predict, the server):

- **temperature scaling**: one number T, the rank scores divided by it before the softmax, chosen to minimise the
  validation split's negative log-likelihood (Guo et al. 2017). It changes no prediction, only how sure they are.
- **label sets** (split conformal prediction with the score 1 - p(true label)): with the validation rows' scores
  kept, any `coverage` gives a threshold such that the set {labels with p >= 1 - threshold} holds the true label
  at least `coverage` of the time on data exchangeable with the validation split (Vovk et al.; Angelopoulos &
  Bates 2021). A set is never empty: the top label is always in it (this can only add coverage). The same
  validation rows fit T and give the scores; with one parameter fitted the guarantee is approximate, and the
  report measures the coverage on the test split.
- **abstention**: below `min_confidence`, the answer is "abstain".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmtune.core.errors import UserError

ABSTAIN = "abstain"


def fit_temperature(scores: torch.Tensor, true: torch.Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(scores / T) (rows x labels) for the true label indices."""
    scores, true = scores.detach().double(), torch.as_tensor(true, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(scores / log_t.exp(), true)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(1e-3, 1e3))


def conformal_scores(probs: torch.Tensor, true) -> list[float]:
    """The nonconformity of each calibration row: 1 - its true label's probability."""
    true = torch.as_tensor(true, dtype=torch.long)
    return (1 - probs.double()[torch.arange(len(true)), true]).tolist()


def conformal_threshold(scores: list[float], coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest calibration score; infinite (every label) when n is too small for
    the coverage asked."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage={coverage}: must be between 0 and 1 (e.g. 0.9)")
    n = len(scores)
    k = math.ceil((n + 1) * coverage)
    return math.inf if k > n else sorted(scores)[k - 1]


def label_set(probs: list[float], labels: list[str], threshold: float) -> list[str]:
    """The labels whose probability is at least 1 - threshold, most probable first; never empty."""
    ranked = sorted(zip(labels, probs, strict=True), key=lambda kv: -kv[1])
    return [label for n, (label, p) in enumerate(ranked) if n == 0 or 1 - p <= threshold]


@dataclass
class Calibration:
    """What the export keeps (`calibration.json`): the temperature and the validation rows' conformal scores."""

    temperature: float = 1.0
    scores: list[float] = field(default_factory=list)  # 1 - p(true) on validation, after the temperature
    fitted_on: str = ""

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.double() / self.temperature, dim=-1)

    def threshold(self, coverage: float) -> float:
        if not self.scores:
            raise ValueError("no calibration scores: this export was written before label sets existed")
        return conformal_threshold(self.scores, coverage)

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "scores": [round(s, 7) for s in self.scores],
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration.json") -> Calibration:
        """Read back from disk: each value checked, so a hand-edited file is refused in one line."""
        temperature = data.get("temperature")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < 1e4:
            raise ValueError(f"{where}: temperature must be a positive number, not {temperature!r}")
        scores = data.get("scores") or []
        if not isinstance(scores, list) or not all(
            isinstance(s, int | float) and not isinstance(s, bool) and 0 <= s <= 1 for s in scores
        ):
            raise ValueError(f"{where}: scores must be a list of numbers from 0 to 1")
        return cls(float(temperature), [float(s) for s in scores], str(data.get("fitted_on", "")))

    @classmethod
    def fit(cls, scores: torch.Tensor, true, fitted_on: str) -> Calibration:
        temperature = fit_temperature(scores, torch.as_tensor(true))
        probs = torch.softmax(scores.double() / temperature, dim=-1)
        return cls(temperature, conformal_scores(probs, true), fitted_on)


def checked_threshold(calibration: Calibration | None, coverage, min_confidence, source: str) -> float | None:
    """The conformal threshold for `coverage` (None without one), after checking both settings; a setting that
    cannot be honoured is one line naming it."""
    if min_confidence is not None and (
        isinstance(min_confidence, bool) or not isinstance(min_confidence, int | float) or not 0 <= min_confidence <= 1
    ):
        raise UserError(f"min_confidence={min_confidence}: a probability from 0 to 1 (e.g. 0.5), or null.")
    if coverage is None:
        return None
    if isinstance(coverage, bool) or not isinstance(coverage, int | float) or not 0 < coverage < 1:
        raise UserError(f"coverage={coverage}: a fraction between 0 and 1 (e.g. 0.9), or null.")
    if calibration is None or not calibration.scores:
        raise UserError(
            f"coverage={coverage}: {source} has no calibration.json (trained before label sets existed, or without "
            "a validation split); train again, or leave coverage=null."
        )
    return calibration.threshold(coverage)
