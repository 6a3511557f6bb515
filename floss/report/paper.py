"""The paper's numbers, loaded from the one file that types them (``floss/resources/paper_numbers.yaml``).

Every accessor returns percent values exactly as printed in the paper and raises :class:`KeyError` naming
the table and the missing key when asked for something the paper does not report.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import pandas as pd
import yaml

#: display names of the model keys used throughout the pipeline
MODEL_LABELS = {"maskclip": "MaskCLIP", "naclip": "NACLIP", "clipdinoiser": "CLIP-DINOiser",
                "naclip_vitl14": "NACLIP (ViT-L/14)", "sclip": "SCLIP", "clearclip": "ClearCLIP", "gem": "GEM",
                "sclip_vitl14": "SCLIP (ViT-L/14)", "gem_vitl14": "GEM (ViT-L/14)",
                "gem_quoted": "GEM-quoted [3]", "resclip": "ResCLIP", "scclip": "SC-CLIP"}
#: short dataset column names, as the paper's tables print them
DATASET_LABELS = {"cityscapes": "CS", "pascalvoc20": "VOC20", "pascalco59": "PC59", "ade20k": "ADE",
                  "cocostuff": "Stuff", "acdc_night": "Night", "acdc_fog": "Fog", "acdc_rain": "Rain",
                  "acdc_snow": "Snow", "bdd": "BDD", "mapillary": "MAP", "avg": "Avg"}
#: the one file that types the paper's numbers (shipped as package data)
PAPER_NUMBERS_FILE = Path(__file__).resolve().parents[1] / "resources" / "paper_numbers.yaml"
#: the items every complete file must hold (checked on load)
REQUIRED_ITEMS = ("table1", "table2", "table3", "table4", "table5", "fig4c", "fig5", "oracle", "fusion")


@functools.lru_cache(maxsize=1)
def _load() -> dict:
    data = yaml.safe_load(PAPER_NUMBERS_FILE.read_text(encoding="utf-8"))
    missing = [k for k in REQUIRED_ITEMS if k not in data]
    if missing:
        raise ValueError(f"floss/resources/paper_numbers.yaml: expected items {list(REQUIRED_ITEMS)}, "
                         f"missing {missing}")
    return data


def paper_numbers() -> dict:
    """All the paper's numbers as a nested dict (a deep copy: callers may modify it)."""
    return copy.deepcopy(_load())


def _get(item: str, *keys):
    node = _load()[item]
    path = [item]
    for key in keys:
        path.append(str(key))
        if not isinstance(node, dict) or key not in node:
            have = sorted(map(str, node)) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"paper {'/'.join(path)}: not reported by the paper (available: {have})")
        node = node[key]
    return node


def source_of(item: str) -> str:
    """Where in the paper ``item`` (e.g. ``"table3"``, ``"oracle"``) comes from."""
    return _get(item, "from")


def paper_miou(model: str, dataset: str, method: str = "floss") -> float:
    """mIoU (%) of ``model`` (+FLOSS when ``method="floss"``, else ``"baseline"``) on ``dataset``.

    Looks in Table 1 (the five ranking datasets), Table 3 (transfer sets) and Table 5 (``naclip_vitl14``).
    Cityscapes baselines come from Table 1 (Table 3 prints slightly different ones, see :func:`table_frame`).
    """
    if method not in ("baseline", "floss"):
        raise ValueError(f"method: expected 'baseline' or 'floss', received {method!r}")
    if model == "naclip_vitl14":
        return float(_get("table5", "reproduced", "vitl14", method, dataset))
    if dataset in _get("table1", "datasets") or dataset == "avg":
        return float(_get("table1", "reproduced", model, method, dataset))
    return float(_get("table3", "reproduced", model, method, dataset))


def table_frame(item: str, variant: str | None = None) -> pd.DataFrame:
    """The paper's table as a DataFrame (rows: methods, columns: dataset keys + ``avg``).

    ``item`` in table1, table3 (rows ``"<model>"`` and ``"<model>+floss"`` plus quoted rows for table1),
    table5 (``variant`` = ``"vitb16"`` or ``"vitl14"``), table2 (rows: models, ρ̂ %), table4 (rows: models,
    columns: fusion keys). A ``quoted`` column flags rows quoted from the paper rather than reproduced.
    """
    rows: dict[str, dict] = {}
    if item in ("table1", "table3"):
        datasets = list(_get(item, "datasets")) + ["avg"]
        for q in (_get(item, "quoted") if item == "table1" else []):
            rows[q.get("reproduced_by", q["method"])] = {**{d: q.get(d) for d in datasets},
                                                          "quoted": "reproduced_by" not in q}
        for model, methods in _get(item, "reproduced").items():
            rows[model] = {**{d: methods["baseline"].get(d) for d in datasets}, "quoted": False}
            rows[f"{model}+floss"] = {**{d: methods["floss"].get(d) for d in datasets}, "quoted": False}
    elif item == "table5":
        if variant not in ("vitb16", "vitl14"):
            raise ValueError(f"variant: expected 'vitb16' or 'vitl14' for table5, received {variant!r}")
        datasets = list(_get(item, "datasets")) + ["avg"]
        for q in _get(item, "quoted", variant):
            rows[q.get("reproduced_by", q["method"])] = {**{d: q.get(d) for d in datasets},
                                                          "quoted": "reproduced_by" not in q}
        rep = _get(item, "reproduced", variant)
        rows[rep["model"]] = {**{d: rep["baseline"].get(d) for d in datasets}, "quoted": False}
        rows[f"{rep['model']}+floss"] = {**{d: rep["floss"].get(d) for d in datasets}, "quoted": False}
    elif item == "table2":
        datasets = list(_get(item, "datasets")) + ["avg"]
        rows = {m: {**{d: v.get(d) for d in datasets}, "quoted": False} for m, v in _get(item, "rho").items()}
    elif item == "table4":
        fusions = list(_get(item, "fusions"))
        rows = {m: {**{f: v.get(f) for f in fusions}, "quoted": False} for m, v in _get(item, "miou").items()}
    else:
        raise ValueError(f"item: expected one of table1..table5, received {item!r}")
    frame = pd.DataFrame.from_dict(rows, orient="index")
    value_cols = [c for c in frame.columns if c != "quoted"]
    frame[value_cols] = frame[value_cols].astype("float64")
    return frame


def expert_quality(model: str, dataset: str) -> float:
    """Table 2: mean over classes of ρ̂_k (%) for ``model`` + FLOSS on ``dataset`` (or ``"avg"``)."""
    return float(_get("table2", "rho", model, dataset))


def fusion_miou(model: str, fusion: str) -> float:
    """Table 4: Cityscapes mIoU (%) of ``model`` + FLOSS with the fusion strategy ``fusion``."""
    return float(_get("table4", "miou", model, fusion))


def metric_miou(metric: str) -> float:
    """Fig. 4(c): CLIP-DINOiser/Cityscapes mIoU (%) with experts chosen by ``metric``."""
    return float(_get("fig4c", "miou", metric))


def oracle_miou(n: int) -> float:
    """Sec. 5.2: oracle (top-N experts by true IoU) mIoU (%) of CLIP-DINOiser on Cityscapes, N in 1..4."""
    return float(_get("oracle", "miou", int(n)))


def rho_100_miou() -> float:
    """Fig. 5: mIoU (%) with ρ = 100 % true experts (CLIP-DINOiser, Cityscapes)."""
    return float(_get("fig5", "rho_100_miou"))


def fallback_percent() -> float:
    """Sec. 4.2: share of pixels (%) where no expert predicts its own class (the W_CLIP fallback)."""
    return float(_get("fusion", "fallback_pixels_percent"))


def model_label(model: str) -> str:
    """Display name of a model key (unknown keys, e.g. a user's model, are shown as given)."""
    return MODEL_LABELS.get(model, model)


def dataset_label(dataset: str) -> str:
    """Short column name of a dataset key (unknown keys are shown as given)."""
    return DATASET_LABELS.get(dataset, dataset)
