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

Candidates beyond the paper (the metric bench, ``notebooks/metric_bench.py``; formulas in each docstring):
``margin`` (top-1 − top-2 probability), ``kurtosis`` (excess kurtosis of the probability vector), ``spatial``
(agreement of the argmax map with its 4-neighbours; ``kind="map"``) and ``rank_ensemble`` (mean rank of a template
over other metrics; ``kind="ensemble"``). The paper's four keep their numbers bit for bit.

Metric kinds (``MetricSpec.kind``):

* ``"pixel"``: ``pixel_score(q [m, K, P]) -> [m, P]``, pixels in any order (TemplateStats hands it blocks of rows);
* ``"map"``: ``pixel_score(q [m, K, H, W]) -> [m, H, W]``, the whole upsampled map of each template (spatial
  layout kept), the statistic again the mean over the pixels predicted as each class (costs one more upsampling
  pass per template);
* ``"ensemble"``: no per-pixel score; the per-class statistic is computed at rankings time from the statistics of
  the ``members`` metrics (which must be tracked too);
* ``"features"``: ITI.

Your own metric (a *plug-in*): a module on ``sys.path`` with a function of no arguments, named as
``"module:function"`` (``python -m floss rank --metric-plugin my_metrics:register``, params.yaml
``rank.metric_plugins``; :func:`load_metric_plugin`). The function either registers its metrics itself with
:func:`register_metric` and returns None, or returns what to register: a :class:`MetricSpec`, a dict of
:func:`register_metric`'s keyword arguments (``name``, ``pixel_score``, ``higher_is_better``, optional
``finalize``, ``kind``, ``members``), or a list of those. A name that is already registered is refused (no
silent replacement of a built-in). Rankings checkpoints and statistics are keyed by a digest of the plug-in
module's source (:func:`metric_plugin_digest`: its file, or every ``.py`` file of a package), so editing the
plug-in recomputes; code the plug-in imports from elsewhere is not part of that key.
"""
from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["MetricSpec", "register_metric", "get_metric", "available_metrics", "ENTROPY_EPS", "MANO_P",
           "MANO_CRITERION", "KINDS", "load_metric_plugin", "load_metric_plugins", "metric_plugin_digest",
           "ensemble_values", "PLUGIN_PATTERN", "spatial_of_argmax"]

#: the metric kinds TemplateStats knows (module docstring)
KINDS = ("pixel", "map", "ensemble", "features")
#: ``module:function`` (dotted module path, a function name)
PLUGIN_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")

ENTROPY_EPS = 1e-10  # inside the log, as the authors
MANO_P = 4
MANO_CRITERION = 5.0


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric. ``kind``: ``"pixel"`` (mean of ``pixel_score`` over pixels), ``"map"`` (the same with
    ``pixel_score`` given whole maps ``[m, K, H, W]``), ``"ensemble"`` (from the ``members``' statistics) or
    ``"features"`` (ITI)."""
    name: str
    pixel_score: Callable[[torch.Tensor], torch.Tensor] | None
    higher_is_better: bool
    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    kind: str = "pixel"
    members: tuple[str, ...] = ()


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(name: str, pixel_score: Callable[[torch.Tensor], torch.Tensor] | None, higher_is_better: bool,
                    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                    overwrite: bool = False, kind: str = "pixel", members: Sequence[str] = ()) -> MetricSpec:
    """Register a metric by name.

    ``pixel_score(q)`` receives float32/float64 probabilities ``[m, K, P]`` and returns ``[m, P]``
    (``kind="map"``: ``[m, K, H, W]`` -> ``[m, H, W]``); the statistic is the mean of the score over the pixels
    predicted as each class, passed through ``finalize`` when given. ``kind="ensemble"`` takes no
    ``pixel_score`` but ``members`` (registered metric names). Re-registering an existing name needs
    ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected an identifier-like string, received {name!r}")
    if kind not in ("pixel", "map", "ensemble"):
        raise ValueError(f"kind: expected 'pixel', 'map' or 'ensemble', received {kind!r}")
    if kind == "ensemble":
        if pixel_score is not None:
            raise TypeError(f"pixel_score: an ensemble metric has none (pass None), received {pixel_score!r}")
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ValueError(f"members: expected a non-empty list of registered metric names, received {members!r}")
        for m in members:
            if get_metric(m).kind == "ensemble":
                raise ValueError(f"members: expected non-ensemble metrics, received ensemble {m!r}")
        members = tuple(members)
    elif members:
        raise ValueError(f"members: only for kind='ensemble', received {members!r} with kind={kind!r}")
    elif not callable(pixel_score):
        shape = "q[m, K, H, W] -> [m, H, W]" if kind == "map" else "q[m, K, P] -> [m, P]"
        raise TypeError(f"pixel_score: expected a callable {shape}, received {pixel_score!r}")
    if not isinstance(higher_is_better, bool):
        raise TypeError(f"higher_is_better: expected a bool, received {higher_is_better!r}")
    if finalize is not None and not callable(finalize):
        raise TypeError(f"finalize: expected a callable or None, received {finalize!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name: metric {name!r} is already registered (pass overwrite=True to replace it)")
    spec = MetricSpec(name, pixel_score, higher_is_better, finalize, kind, tuple(members))
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


# ------------------------------------------------------------------------------- candidates beyond the paper
def margin_score(q: torch.Tensor) -> torch.Tensor:
    """Probability margin ``q_(1) − q_(2)`` (largest minus second-largest class probability) of ``q [m, K, P]``
    -> ``[m, P]`` (``K = 1``: ``q_(1)``). Higher is better (a confident single-template decision)."""
    if q.shape[1] == 1:
        return q[:, 0].clone()
    top = q.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


#: the excess kurtosis of a constant vector (``m2 = 0``): the smallest value any vector reaches (``m4/m2² >= 1``)
KURTOSIS_CONSTANT = -2.0


def kurtosis_score(q: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of the probability vector over its ``K`` classes, in float64: with ``μ = mean_j q_j``,
    ``m_r = mean_j (q_j − μ)^r``, ``κ = m_4 / m_2² − 3`` -> ``[m, P]``; a constant vector (``m_2 = 0``) gets
    ``KURTOSIS_CONSTANT = −2``. Higher is better (mass on few classes: a peaked, decided prediction)."""
    d = q.double()
    d = d - d.mean(dim=1, keepdim=True)
    d2 = d * d
    m2 = d2.mean(dim=1)
    m4 = (d2 * d2).mean(dim=1)
    kurt = m4 / (m2 * m2).clamp_min(torch.finfo(torch.float64).tiny) - 3.0
    return torch.where(m2 > 0, kurt, torch.full_like(kurt, KURTOSIS_CONSTANT))


def spatial_score(q: torch.Tensor) -> torch.Tensor:
    """Spatial consistency of the argmax map ``c(x) = argmax_j q_j(x)`` (first index on ties) of ``q [m, K, H, W]``:
    ``s(x) = |{y ∈ N4(x) : c(y) = c(x)}| / |N4(x)|``, the share of the pixel's 4-neighbours inside the image that
    predict the same class (a 1×1 map: ``s = 1``) -> ``[m, H, W]``. Higher is better (coherent regions rather
    than salt-and-pepper decisions). A ``kind="map"`` metric: it needs the spatial layout."""
    return spatial_of_argmax(q.argmax(dim=1), q.dtype)


def spatial_of_argmax(pred: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`spatial_score` from the argmax map ``pred [m, H, W]`` alone (scores of ``dtype``): the statistics
    kernel reuses the argmax it already computed instead of upsampling every map a second time."""
    m, h, w = pred.shape
    same = torch.zeros(m, h, w, dtype=dtype, device=pred.device)
    count = torch.zeros(1, h, w, dtype=dtype, device=pred.device)
    vert = (pred[:, 1:] == pred[:, :-1]).to(dtype)
    horiz = (pred[:, :, 1:] == pred[:, :, :-1]).to(dtype)
    same[:, 1:] += vert
    same[:, :-1] += vert
    same[:, :, 1:] += horiz
    same[:, :, :-1] += horiz
    count[:, 1:] += 1
    count[:, :-1] += 1
    count[:, :, 1:] += 1
    count[:, :, :-1] += 1
    return torch.where(count > 0, same / count.clamp_min(1), torch.ones_like(same))


#: the members of the built-in ``rank_ensemble``: the paper's three pixel metrics
ENSEMBLE_MEMBERS = ("entropy", "avgprob", "mano")


def ensemble_values(values: Sequence[torch.Tensor], higher_is_better: Sequence[bool]) -> torch.Tensor:
    """``rank_ensemble``: per class ``k``, each member metric ranks the templates that have a value (1 = best in
    the metric's orientation, ties share their average rank), and the statistic is the mean of a template's ranks
    over the members that define it: ``R_{m,k} = mean_i rank_i(m; k)``. NaN where no member has a value. Lower is
    better. ``values``: the members' ``[M, K]`` statistics (NaN: template never predicts the class)."""
    ranks = []
    for v, hib in zip(values, higher_is_better):
        v = v.double()
        valid = ~torch.isnan(v)
        o = -v if hib else v            # lower = better
        below = ((o.unsqueeze(0) < o.unsqueeze(1)) & valid.unsqueeze(0)).sum(1)      # [M, K]: strictly better
        upto = ((o.unsqueeze(0) <= o.unsqueeze(1)) & valid.unsqueeze(0)).sum(1)      # better or tied (self)
        r = (below + 1 + upto).double() / 2
        ranks.append(torch.where(valid, r, torch.full_like(r, float("nan"))))
    return torch.stack(ranks).nanmean(dim=0)


register_metric("margin", margin_score, higher_is_better=True)
register_metric("kurtosis", kurtosis_score, higher_is_better=True)
register_metric("spatial", spatial_score, higher_is_better=True, kind="map")
register_metric("rank_ensemble", None, higher_is_better=False, kind="ensemble", members=ENSEMBLE_MEMBERS)


# -------------------------------------------------------------------------------------------------- plug-ins
_PLUGINS: dict[str, list[str]] = {}       # "module:function" -> the metric names it provided (loaded once)


def _register_returned(value, spec: str, argument: str) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    names = []
    for item in items:
        if isinstance(item, MetricSpec):
            item = {"name": item.name, "pixel_score": item.pixel_score, "higher_is_better": item.higher_is_better,
                    "finalize": item.finalize, "kind": item.kind, "members": item.members}
        if not isinstance(item, Mapping) or "name" not in item:
            raise ValueError(f"{argument}: {spec!r} returned {type(item).__name__}; expected None (it registers its "
                             "metrics itself), a MetricSpec, a dict of register_metric's arguments (name, "
                             "pixel_score, higher_is_better, ...) or a list of those")
        if item["name"] in _REGISTRY:
            raise ValueError(f"{argument}: {spec!r} provides metric {item['name']!r}, which is already registered "
                             f"(known metrics: {available_metrics()}); expected a new name")
        try:
            register_metric(**dict(item))
        except TypeError as err:
            raise ValueError(f"{argument}: {spec!r} returned a metric register_metric refuses ({err})") from None
        names.append(item["name"])
    return names


def load_metric_plugin(spec: str, argument: str = "--metric-plugin") -> list[str]:
    """Import ``"module:function"`` and register the metrics it provides (module docstring: the contract); returns
    their names. Loading the same plug-in again in one process returns the same names without calling it twice.
    Errors are ``ValueError`` naming ``argument`` (a missing module, a missing or non-callable function, a name
    clash, a result of the wrong type)."""
    if not isinstance(spec, str) or not PLUGIN_PATTERN.match(spec):
        raise ValueError(f"{argument}: expected 'module:function' (e.g. 'my_metrics:register'), received {spec!r}")
    if spec in _PLUGINS:
        return list(_PLUGINS[spec])
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{argument}: cannot import module {module_name!r} of {spec!r} ({err}); expected a module "
                         "on sys.path (the current folder or PYTHONPATH)") from None
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise ValueError(f"{argument}: module {module_name!r} has no function {func_name!r} (found "
                         f"{type(func).__name__}); expected a callable taking no arguments")
    before = set(_REGISTRY)
    try:
        value = func()
    except ValueError as err:       # e.g. register_metric refusing a name that exists
        raise ValueError(f"{argument}: {spec!r} failed: {err}") from None
    names = [n for n in _REGISTRY if n not in before]
    if value is not None:
        names += _register_returned(value, spec, argument)
    if not names:
        raise ValueError(f"{argument}: {spec!r} registered no metric and returned None; expected it to call "
                         "floss.register_metric or to return a MetricSpec / dict")
    _PLUGINS[spec] = names
    logger.info("metric plug-in %s: %s", spec, ", ".join(names))
    return list(names)


def load_metric_plugins(specs: Sequence[str], argument: str = "--metric-plugin") -> list[str]:
    """:func:`load_metric_plugin` for each of ``specs`` (in order); all the metric names provided."""
    if isinstance(specs, str) or not isinstance(specs, Sequence):
        raise ValueError(f"{argument}: expected a list of 'module:function' strings, received {specs!r}")
    return [name for s in specs for name in load_metric_plugin(s, argument)]


def metric_plugin_digest(specs: Sequence[str], argument: str = "--metric-plugin") -> dict[str, str]:
    """``{"module:function": "sha256:..."}``: a digest of each plug-in module's source (its file; a package: every
    ``.py`` file under its folder), the part of a rankings key that floss's own code digest cannot see. Empty for
    no plug-ins (keys of runs without plug-ins stay as they were)."""
    from floss.util.provenance import module_source_digest

    out = {}
    for s in specs:
        if not isinstance(s, str) or not PLUGIN_PATTERN.match(s):
            raise ValueError(f"{argument}: expected 'module:function' (e.g. 'my_metrics:register'), received {s!r}")
        try:
            out[s] = module_source_digest(s.split(":")[0])
        except (ImportError, FileNotFoundError) as err:
            raise ValueError(f"{argument}: cannot locate the source of {s!r} ({err}); expected a module on "
                             "sys.path") from None
    return out
