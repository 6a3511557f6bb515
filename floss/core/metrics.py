"""Registry of per-class template-quality metrics used by :class:`floss.core.stats.TemplateStats`.

A *pixel metric* is a function ``pixel_score(q [m, K, P]) -> [m, P]`` of the probability vectors of ``P``
pixels under ``m`` templates. The statistic of template ``m`` for class ``k`` is the mean of that score over
the pixels that template ``m`` predicts as ``k`` (argmax, first index on ties), optionally transformed by
``finalize(mean [M, K] float64) -> [M, K]``. Built-ins (registered exactly like a user's metric):

* ``entropy`` (paper Eq. 5, authors' code): ``H = -Σ_j q_j ln(q_j + 1e-10)``, natural log, not normalised
  by ``ln K``. Lower is better.
* ``avgprob`` (Eq. 9, ``softmax(q_i)_k`` read as ``q_i[k]``, protocol §4.2): the predicted class's
  probability, i.e. ``max_j q_j``. Higher is better.
* ``mano`` (Eq. 10, p = 4): ``(mean_i Σ_j |softrun(q_i)_j|^4 / K)^(1/4)``. Higher is better. softrun
  follows the MaNo reference (protocol §4.2) applied to the probability vector ``q`` itself (FLOSS's inputs
  are not recoverable; ``q`` is what every other metric sees): criterion = cross-entropy between the uniform
  distribution and ``softmax(q)``; if it exceeds 5, ``softmax(q)``; otherwise the Taylor normalisation
  ``v = 1 + q + q²/2``, minus its minimum, L1-normalised. The criterion is evaluated **per pixel** (the
  reference evaluates it per batch), so the statistic does not depend on how pixels are chunked. A
  constant vector (``v − min v ≡ 0``) is taken as uniform.
* ``iti`` (Eq. 11) is not a pixel metric: it needs features and is computed by ``TemplateStats`` from
  per-image class-mean features; it is registered here (``kind="features"``) so names resolve in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["MetricSpec", "register_metric", "get_metric", "available_metrics", "ENTROPY_EPS", "MANO_P",
           "MANO_CRITERION"]

ENTROPY_EPS = 1e-10  # inside the log, as the authors
MANO_P = 4
MANO_CRITERION = 5.0


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric. ``kind`` is ``"pixel"`` (mean of ``pixel_score``) or ``"features"`` (ITI)."""
    name: str
    pixel_score: Callable[[torch.Tensor], torch.Tensor] | None
    higher_is_better: bool
    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    kind: str = "pixel"


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(name: str, pixel_score: Callable[[torch.Tensor], torch.Tensor], higher_is_better: bool,
                    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                    overwrite: bool = False) -> MetricSpec:
    """Register a metric by name.

    ``pixel_score(q)`` receives float32/float64 probabilities ``[m, K, P]`` and returns ``[m, P]``; the
    statistic is the mean of the score over the pixels predicted as each class, passed through
    ``finalize`` when given. Re-registering an existing name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected an identifier-like string, received {name!r}")
    if not callable(pixel_score):
        raise TypeError(f"pixel_score: expected a callable q[m, K, P] -> [m, P], received {pixel_score!r}")
    if not isinstance(higher_is_better, bool):
        raise TypeError(f"higher_is_better: expected a bool, received {higher_is_better!r}")
    if finalize is not None and not callable(finalize):
        raise TypeError(f"finalize: expected a callable or None, received {finalize!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name: metric {name!r} is already registered (pass overwrite=True to replace it)")
    spec = MetricSpec(name, pixel_score, higher_is_better, finalize)
    _REGISTRY[name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    """The registered :class:`MetricSpec` called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"metric: unknown metric {name!r}; known metrics: {available_metrics()}") from None


def available_metrics() -> list[str]:
    """Names of all registered metrics, in registration order."""
    return list(_REGISTRY)


# ---------------------------------------------------------------------------------------------- built-ins
def entropy_score(q: torch.Tensor) -> torch.Tensor:
    """Per-pixel Shannon entropy (nats) ``-Σ_j q_j ln(q_j + 1e-10)`` of ``q [m, K, P]`` -> ``[m, P]``."""
    t = q + ENTROPY_EPS  # in-place steps afterwards: one temporary instead of three
    t.log_()
    t.mul_(q)
    return t.sum(dim=1).neg_()


def avgprob_score(q: torch.Tensor) -> torch.Tensor:
    """Probability of the predicted class, ``max_j q_j`` -> ``[m, P]``."""
    return q.amax(dim=1)


def _softmax(q: torch.Tensor) -> torch.Tensor:
    """``exp(q − max)/Σ``: the same bits on every CPU (torch.softmax's fused kernel depends on the vector width)."""
    e = torch.exp(q - q.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)


def softrun(q: torch.Tensor) -> torch.Tensor:
    """MaNo's softrun normalisation of ``q [m, K, P]`` along dim 1 (criterion evaluated per pixel)."""
    k = q.shape[1]
    # CE(uniform, softmax(q)) = logsumexp(q) − mean(q)
    soft = (torch.logsumexp(q, dim=1, keepdim=True) - q.mean(dim=1, keepdim=True)) > MANO_CRITERION
    if bool(soft.all()):
        return _softmax(q)
    # Taylor: 1 + q + q²/2 minus its row minimum; the constant 1 cancels in the subtraction
    v = torch.addcmul(q, q, q, value=0.5)
    v.sub_(v.amin(dim=1, keepdim=True))
    norm = v.sum(dim=1, keepdim=True)
    v.div_(norm.clamp_min(torch.finfo(q.dtype).tiny))
    degenerate = norm == 0  # constant vector: no direction to keep, taken as uniform
    if bool(degenerate.any()):
        v = torch.where(degenerate, torch.full_like(v, 1.0 / k), v)
    if bool(soft.any()):
        v = torch.where(soft, _softmax(q), v)
    return v


def mano_score(q: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``Σ_j |softrun(q)_j|^4 / K`` (the mean over pixels is raised to 1/4 by ``mano_finalize``)."""
    v = softrun(q)
    v.mul_(v)
    return torch.linalg.vector_norm(v, ord=2, dim=1).pow_(2).div_(q.shape[1])


def mano_finalize(mean: torch.Tensor) -> torch.Tensor:
    return mean.clamp_min(0) ** (1.0 / MANO_P)


register_metric("entropy", entropy_score, higher_is_better=False)
register_metric("avgprob", avgprob_score, higher_is_better=True)
register_metric("mano", mano_score, higher_is_better=True, finalize=mano_finalize)
_REGISTRY["iti"] = MetricSpec("iti", None, higher_is_better=True, kind="features")
