"""Rankings files (the authors' JSON schema, protocol §3.1), expert selection (Eq. 6, §3.8), and the oracle /
ρ-mixed expert sets and expert quality of the paper's analysis (Eq. 4, Eq. 8, Fig. 5).

Schema: ``{"model", "dataset", "split", "classes": {name: {"<metric>_ranking": [M × {"template_id",
"<metric>", "pixel_percentage", "rank"}]}}}``, best first. Entropy keeps ``"entropy_ranking"``/``"entropy"``
so files are byte-compatible with the authors'. With CLIP's 80 templates (the authors' set) that is all; with any
other template set a ``"templates"`` list of the M texts (template id = position) sits before ``"classes"``, so a
file says which prompts its ids mean (:func:`rankings_templates`; readers of the authors' schema ignore the key). Templates that never predict a class carry
``pixel_percentage == 0`` and are skipped by :func:`select_experts` (they would otherwise rank first, §3.6).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from floss.core.checks import check_tensor
from floss.util.io import atomic_write_text
from floss.core.templates import DEFAULT_TEMPLATES, NUM_TEMPLATES, TemplateSet, as_template_set

logger = logging.getLogger(__name__)


def ranking_key(metric: str) -> str:
    """The per-class list key for ``metric`` (``"entropy"`` -> ``"entropy_ranking"``)."""
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric: expected a non-empty metric name, received {metric!r}")
    return f"{metric}_ranking"


def load_rankings(path: str | os.PathLike) -> dict:
    """Read a rankings JSON file (no validation: call :func:`validate_rankings`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: rankings file {path} does not exist")
    try:
        with path.open() as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"path: {path} is not valid JSON ({err})") from err


def save_rankings(rankings: Mapping, path: str | os.PathLike, metric: str = "entropy") -> Path:
    """Validate and write ``rankings`` atomically (temp file in the same folder, then ``os.replace``)."""
    validate_rankings(rankings, metric=metric)
    return atomic_write_text(path, json.dumps(rankings, indent=2))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _recorded_templates(rankings: Mapping) -> TemplateSet | None:
    """The ``"templates"`` list of a rankings dict as a TemplateSet (None when absent), or a ValueError."""
    if rankings.get("templates") is None:
        return None
    try:
        return TemplateSet(rankings["templates"], source="rankings['templates']")
    except (TypeError, ValueError) as err:
        raise ValueError(f"rankings['templates']: expected a list of distinct template texts with one '{{}}' each "
                         f"({err})") from None


def rankings_num_templates(rankings: Mapping, metric: str = "entropy") -> int:
    """M of a rankings dict: the length of its ``"templates"`` list, else the number of entries most classes hold
    (ties: the larger; so :func:`validate_rankings` names the class that deviates)."""
    recorded = _recorded_templates(rankings)
    if recorded is not None:
        return len(recorded)
    classes = rankings.get("classes") if isinstance(rankings, Mapping) else None
    key = ranking_key(metric)
    lengths = [len(e[key]) for e in classes.values() if isinstance(e, Mapping) and isinstance(e.get(key), list)
               and e[key]] if isinstance(classes, Mapping) else []
    if not lengths:
        return NUM_TEMPLATES
    return max(set(lengths), key=lambda n: (lengths.count(n), n))


def rankings_templates(rankings: Mapping, metric: str = "entropy") -> TemplateSet:
    """The template set whose ids a rankings dict uses: its ``"templates"`` texts, else CLIP's 80 (a file of the
    authors' schema). A file with M != 80 entries per class and no ``"templates"`` cannot say its prompts."""
    recorded = _recorded_templates(rankings)
    if recorded is not None:
        return recorded
    m = rankings_num_templates(rankings, metric)
    if m != NUM_TEMPLATES:
        raise ValueError(f"rankings: {m} templates per class but no 'templates' list naming them; expected the "
                         f"template texts (written by floss rank) or CLIP's {NUM_TEMPLATES}")
    return DEFAULT_TEMPLATES


def check_rankings_templates(rankings: Mapping, templates, where: str = "rankings", metric: str = "entropy",
                             against: str = "the templates in use") -> None:
    """Raise ``ValueError`` unless the rankings were made with ``templates`` (same texts, same order): expert ids
    of another template set would silently pick other prompts."""
    ts = as_template_set(templates)
    mine = rankings_templates(rankings, metric)
    if tuple(mine) != tuple(ts):
        raise ValueError(f"{where}: ranks {len(mine)} templates ({mine.source}: {_preview(mine)}) but "
                         f"{against} are {len(ts)} ({ts.source}: {_preview(ts)}); expected the same template set "
                         "(pass the --templates file the rankings were made with)")


def _preview(ts: Sequence[str]) -> str:
    return ", ".join(repr(t) for t in ts[:2]) + (", ..." if len(ts) > 2 else "")


def with_templates(rankings: dict, templates) -> dict:
    """``rankings`` with the ``"templates"`` texts recorded before ``"classes"`` — only for a set other than CLIP's
    80, so files of the default set keep the authors' schema byte for byte."""
    ts = as_template_set(templates)
    if ts.is_default:
        return rankings
    out = {k: v for k, v in rankings.items() if k not in ("templates", "classes")}
    out["templates"] = list(ts)
    out["classes"] = rankings["classes"]
    return out


def validate_rankings(rankings: Mapping, class_names: Sequence[str] | None = None, metric: str = "entropy",
                      num_templates: int | None = None) -> None:
    """Check the schema of protocol §3.1; raise ``ValueError`` naming the class/entry/field at fault.

    ``num_templates``: M expected (default: the length of the file's ``"templates"`` list, else of its first
    class's list; 80 for the authors' files). Every class holds ``num_templates`` entries, each template id once, ``rank`` = 1..M in list order, a finite
    value and ``pixel_percentage`` in [0, 100]. With ``class_names``, the classes must be exactly those (missing
    and unknown ones are named; order is not required, :func:`select_experts` follows ``class_names``).
    """
    key = ranking_key(metric)
    if not isinstance(rankings, Mapping) or not isinstance(rankings.get("classes"), Mapping):
        raise ValueError("rankings: expected a dict with a 'classes' dict (authors' schema), received "
                         f"{type(rankings).__name__} with keys {list(rankings)[:5] if isinstance(rankings, Mapping) else '-'}")
    for field in ("model", "dataset", "split"):     # optional descriptors (None: not given)
        if rankings.get(field) is not None and not isinstance(rankings[field], str):
            raise ValueError(f"rankings[{field!r}]: expected a str or None, received {rankings[field]!r}")
    classes = rankings["classes"]
    if not classes:
        raise ValueError("rankings['classes']: expected at least one class, received none")
    recorded = _recorded_templates(rankings)
    if num_templates is None:
        num_templates = rankings_num_templates(rankings, metric)
    elif recorded is not None and len(recorded) != num_templates:
        raise ValueError(f"rankings['templates']: expected {num_templates} templates, received {len(recorded)}")
    if class_names is not None:
        missing = [c for c in class_names if c not in classes]
        unknown = [c for c in classes if c not in set(class_names)]
        if missing or unknown:
            raise ValueError(f"rankings['classes']: classes do not match class_names; missing {missing[:10]}, "
                             f"unknown {unknown[:10]}")
    for name, entry in classes.items():
        where = f"rankings['classes'][{name!r}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get(key), list):
            raise ValueError(f"{where}: expected a dict with a {key!r} list (metric={metric!r}), received "
                             f"{list(entry)[:5] if isinstance(entry, Mapping) else type(entry).__name__}")
        items = entry[key]
        if len(items) != num_templates:
            raise ValueError(f"{where}[{key!r}]: expected {num_templates} entries, received {len(items)}")
        for pos, item in enumerate(items):
            at = f"{where}[{key!r}][{pos}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{at}: expected a dict, received {type(item).__name__}")
            for field, ok, want in (("template_id", _is_int, "an int"), ("rank", _is_int, "an int"),
                                    (metric, _is_number, "a finite number"),
                                    ("pixel_percentage", _is_number, "a finite number")):
                if field not in item or not ok(item[field]):
                    raise ValueError(f"{at}[{field!r}]: expected {want}, received {item.get(field, '<missing>')!r}")
            if not 0 <= item["template_id"] < num_templates:
                raise ValueError(f"{at}['template_id']: expected 0..{num_templates - 1}, received {item['template_id']}")
            if item["rank"] != pos + 1:
                raise ValueError(f"{at}['rank']: expected {pos + 1} (ranks 1..{num_templates} in list order), "
                                 f"received {item['rank']}")
            if not 0.0 <= item["pixel_percentage"] <= 100.0:
                raise ValueError(f"{at}['pixel_percentage']: expected a value in [0, 100], received "
                                 f"{item['pixel_percentage']}")
        ids = [item["template_id"] for item in items]
        if len(set(ids)) != num_templates:
            dup = sorted({t for t in ids if ids.count(t) > 1})
            raise ValueError(f"{where}[{key!r}]: expected each template id once, received duplicates {dup}")


def _check_n(n) -> int:
    if not _is_int(n) or n < 1:
        raise ValueError(f"n: expected a positive int (experts per class), received {n!r}")
    return int(n)


#: how :func:`select_experts` treats a class with fewer than ``n`` valid templates
FEWER_RULES = ("authors", "error")


def valid_templates(rankings: Mapping, metric: str = "entropy",
                    class_names: Sequence[str] | None = None) -> list[list[int]]:
    """Per class (JSON order, or ``class_names`` order), the template ids with ``pixel_percentage > 0``, best
    first: the templates that predict the class somewhere ("valid", protocol §3.6)."""
    validate_rankings(rankings, class_names=class_names, metric=metric)
    key = ranking_key(metric)
    classes = rankings["classes"]
    order = list(class_names) if class_names is not None else list(classes)
    return [[item["template_id"] for item in classes[name][key] if item["pixel_percentage"] > 0.0] for name in order]


def select_experts(rankings: Mapping, n: int = 4, metric: str = "entropy",
                   class_names: Sequence[str] | None = None, fewer: str = "authors") -> list[list[int]]:
    """Top-``n`` templates per class (Eq. 6 as implemented, protocol §3.8): the stored order (best first), entries
    with ``pixel_percentage == 0`` (never-predicting templates) dropped, the first ``n`` kept. One list per class,
    in the JSON's class order or in ``class_names`` order.

    ``fewer``: a class with fewer than ``n`` valid templates (small train sets) —
    ``"authors"`` (default, the authors' MaskCLIP/CLIP-DINOiser inferencer): keep the valid ones; with none, all
    M templates (M of the rankings: any template set), i.e. the class's expert is the averaged classifier; logged as a warning. ``"error"``: raise.
    (The authors' NACLIP crashes in that case; the shipped rankings never reach it.)
    """
    n = _check_n(n)
    if fewer not in FEWER_RULES:
        raise ValueError(f"fewer: expected one of {FEWER_RULES}, received {fewer!r}")
    order = list(class_names) if class_names is not None else list(rankings.get("classes", {}))
    valid = valid_templates(rankings, metric, class_names)
    short = [(name, len(v)) for name, v in zip(order, valid) if len(v) < n]
    if short and fewer == "error":
        name, count = short[0]
        raise ValueError(f"rankings: class {name!r} has only {count} valid templates (pixel_percentage > 0), fewer "
                         f"than n={n} ({len(short)} such classes); fewer='authors' keeps the valid ones")
    if short:
        logger.warning("%d classes have fewer than %d valid templates; kept the valid ones (none: all %d templates, "
                       "the averaged classifier): %s", len(short), n, rankings_num_templates(rankings, metric),
                       ", ".join(f"{name} ({count})" for name, count in short[:10]))
    num_templates = rankings_num_templates(rankings, metric)
    return [v[:n] if v else list(range(num_templates)) for v in valid]


# --- oracle analysis: needs per-template IoU on labelled data -----------------------------------------------

def _check_iou(iou, baseline_iou=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_tensor("iou", iou, ndim=2, floating=True)
    if bool(torch.isinf(iou).any()) or bool((iou < 0).any()):
        raise ValueError("iou: expected non-negative finite IoU values (NaN allowed for absent classes), "
                         "received negative or infinite entries")
    if baseline_iou is not None:
        check_tensor("baseline_iou", baseline_iou, shape=[iou.shape[1]], floating=True)
        if bool(torch.isinf(baseline_iou).any()) or bool((baseline_iou < 0).any()):
            raise ValueError("baseline_iou: expected non-negative finite IoU values (NaN allowed), received "
                             "negative or infinite entries")
    return iou, baseline_iou


def oracle_experts(iou: torch.Tensor, n: int = 4) -> list[list[int]]:
    """Top-``n`` templates per class by labelled IoU (the paper's oracle, Sec. 5.3).

    ``iou`` is ``[M, K]`` (template × class). Ties go to the smaller template id; NaN IoU is not selectable and
    a class with fewer than ``n`` non-NaN entries raises.
    """
    n = _check_n(n)
    _check_iou(iou)
    scores = torch.nan_to_num(iou.double(), nan=-math.inf)
    # stable descending sort keeps ascending template ids among equal IoUs
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    valid = (~torch.isnan(iou)).sum(dim=0)
    short = [k for k in range(iou.shape[1]) if int(valid[k]) < n]
    if short:
        raise ValueError(f"iou: classes {short[:10]} have fewer than n={n} templates with a defined IoU")
    return order[:n].T.tolist()


def true_experts(iou: torch.Tensor, baseline_iou: torch.Tensor) -> list[set[int]]:
    """Eq. 4: per class, the templates whose IoU is strictly greater than the averaged classifier's.

    A NaN (absent class) compares false, so such a class has no true experts.
    """
    _check_iou(iou, baseline_iou)
    better = iou > baseline_iou[None, :]
    return [set(torch.nonzero(better[:, k]).flatten().tolist()) for k in range(iou.shape[1])]


def mixed_experts(iou: torch.Tensor, baseline_iou: torch.Tensor, rho: float, n: int = 4, seed: int = 0,
                  on_shortage: str = "error") -> list[list[int]]:
    """Fig. 5: per class, ``round(rho·n)`` templates sampled among true experts, the rest among non-experts.

    Sampling is uniform without replacement from a ``torch.Generator`` seeded with ``seed`` (classes drawn in
    order, so a seed fixes the whole set). The paper does not say what happens when a class has too few true
    experts (or non-experts): ``on_shortage="error"`` raises naming the classes; ``"fill"`` takes all the
    short side has and completes from the other side (the achieved ratio is then :func:`expert_quality`),
    logging a warning. Returns one list (true experts first) per class.
    """
    n = _check_n(n)
    if not _is_number(rho) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho: expected a ratio in [0, 1], received {rho!r}")
    if on_shortage not in ("error", "fill"):
        raise ValueError(f"on_shortage: expected 'error' or 'fill', received {on_shortage!r}")
    if not _is_int(seed):
        raise ValueError(f"seed: expected an int, received {seed!r}")
    experts = true_experts(iou, baseline_iou)
    num_templates = iou.shape[0]
    if n > num_templates:
        raise ValueError(f"n: expected at most {num_templates} (templates in iou), received {n}")
    want_true = math.floor(rho * n + 0.5)  # round half up: rho=0.5, n=3 -> 2 (Python's round would give 2 too)
    gen = torch.Generator().manual_seed(seed)

    def draw(pool: list[int], count: int) -> list[int]:
        return [pool[i] for i in torch.randperm(len(pool), generator=gen)[:count].tolist()]

    selected, short = [], []
    for k, true_set in enumerate(experts):
        pool_true = sorted(true_set)
        pool_false = sorted(set(range(num_templates)) - true_set)
        n_true = want_true
        if len(pool_true) < want_true or len(pool_false) < n - want_true:
            short.append(k)
            n_true = min(max(want_true, n - len(pool_false)), len(pool_true))
        selected.append(draw(pool_true, n_true) + draw(pool_false, n - n_true))
    if short:
        msg = (f"classes {short[:20]} have too few true experts or non-experts for rho={rho}, n={n} "
               f"({want_true} true + {n - want_true} non-experts)")
        if on_shortage == "error":
            raise ValueError(f"iou/baseline_iou: {msg}; pass on_shortage='fill' to complete from the other side")
        logger.warning("%s; completed from the other side", msg)
    return selected


def expert_quality(selected: Sequence[Sequence[int]], iou: torch.Tensor,
                   baseline_iou: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Eq. 8: ``ρ̂_k = 100·|Ê_k ∩ E_k| / |Ê_k|`` per class, and its mean over classes.

    Returns ``(quality [K] float64 percent, mean)``. Classes with a NaN baseline IoU (absent from the labelled
    set: true experts undefined) get NaN and are excluded from the mean.
    """
    experts = true_experts(iou, baseline_iou)
    if not isinstance(selected, Sequence) or len(selected) != len(experts):
        raise ValueError(f"selected: expected {len(experts)} template-id lists (one per class), received "
                         f"{len(selected) if isinstance(selected, Sequence) else type(selected).__name__}")
    quality = torch.empty(len(experts), dtype=torch.float64)
    for k, (chosen, true_set) in enumerate(zip(selected, experts)):
        chosen = set(chosen)
        if not chosen:
            raise ValueError(f"selected[{k}]: expected at least one template id, received an empty list")
        quality[k] = math.nan if math.isnan(float(baseline_iou[k])) else 100.0 * len(chosen & true_set) / len(chosen)
    defined = quality[~torch.isnan(quality)]
    return quality, float(defined.mean()) if defined.numel() else math.nan


def experts_overlap(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> list[int]:
    """Per class, ``|set(a_k) ∩ set(b_k)|`` (e.g. the authors' top-4 against ours)."""
    if len(a) != len(b):
        raise ValueError(f"a, b: expected the same number of classes, received {len(a)} and {len(b)}")
    return [len(set(x) & set(y)) for x, y in zip(a, b)]


def iou_matrix_from_json(per_template: Mapping, class_names: Sequence[str],
                         num_templates: int = NUM_TEMPLATES) -> torch.Tensor:    # the authors' files: M = 80
    """``[M, K]`` float64 IoU (percent) from the authors' per-template IoU JSON
    (``{class: {"<template id>": IoU %}}``, e.g. ``iou_per_template_clipdinoiser_cityscapes.json``)."""
    out = torch.empty(num_templates, len(class_names), dtype=torch.float64)
    for k, name in enumerate(class_names):
        if name not in per_template:
            raise ValueError(f"per_template: class {name!r} is missing; it has {list(per_template)[:10]}")
        row = per_template[name]
        for m in range(num_templates):
            value = row.get(str(m))
            out[m, k] = math.nan if value is None else float(value)
    return out
