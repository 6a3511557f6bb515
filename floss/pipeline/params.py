"""Load and validate params.yaml before any heavy work (every pipeline stage starts here).

A bad value fails with one line naming the key, what was expected and what was received, e.g.
``params.yaml: evaluate.n_experts: expected an integer in 1..80, got 0``. Sections not read by the pipeline's
own stages (notebook settings added later) are allowed; unknown keys *inside* a known section are errors, so a
typo never silently falls back to a default. Light imports only (no torch): ``check-params`` stays instant.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from floss.util import paths
from floss.models.matrix import MATRIX_MODELS, MODELS, base_model  # noqa: F401  (re-exported)
from floss.util.provenance import weight_file_problem


RANKING_DATASETS = ("cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff")
TRANSFER_DATASETS = ("acdc_night", "acdc_fog", "acdc_rain", "acdc_snow", "bdd", "mapillary")
#: the built-in metrics (floss.core.metrics registers the same names; rank.metric_plugins adds the user's own)
METRICS = ("entropy", "avgprob", "mano", "iti", "margin", "kurtosis", "spatial", "rank_ensemble")
#: what the built-in rank_ensemble combines (floss.core.metrics.ENSEMBLE_MEMBERS): tracked with it
ENSEMBLE_MEMBERS = ("entropy", "avgprob", "mano")
FUSIONS = ("highest", "average", "default", "average_all")
NUM_TEMPLATES = 80      # CLIP's 80 (``templates: null``); a template file sets its own M (:func:`num_templates`)

_SECTIONS = {
    "authors": {"url", "local", "timeout_s"},
    "transfer": {"models", "datasets"},
    "extract": {"protocol", "device", "gpus", "precision", "cache_dtype", "workers", "images_per_shard",
                "on_bad_image", "dataset_dirs", "weights"},
    "synthetic": {"seed", "feature_dim", "planted_per_class", "images"},
    "rank": {"source", "metrics", "device", "metric_plugins"},
    "evaluate": {"n_experts", "metric", "fusions", "per_template", "device"},
    "low_data": {"model", "datasets", "sizes", "seeds"},
    "oracle": {"rhos", "seeds", "ns"},
    "qualitative": {"num_images"},
}
_OPTIONAL = {"dataset_dirs", "metric_plugins"}     # keys a section may leave out
_REQUIRED = ("profile", "data_root", "authors", "models", "transfer", "extract", "synthetic", "rank", "evaluate")


class ParamsError(ValueError):
    """An invalid params.yaml; the message names the key."""


def _fail(key: str, expected: str, got: Any) -> None:
    raise ParamsError(f"params.yaml: {key}: expected {expected}, got {got!r}")


def _int(p: Mapping, key: str, low: int, high: int | None = None) -> int:
    v = p[key.rsplit(".", 1)[-1]]
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        _fail(key, f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}", v)
    return v


def _choice(value: Any, key: str, choices) -> Any:
    if value not in choices:
        _fail(key, f"one of {', '.join(map(str, choices))}", value)
    return value


def _names(value: Any, key: str, choices, allow_empty: bool = False) -> list:
    if not isinstance(value, list) or (not value and not allow_empty):
        _fail(key, "a list" if allow_empty else "a non-empty list", value)
    for i, v in enumerate(value):
        _choice(v, f"{key}[{i}]", choices)
    if len(set(value)) != len(value):
        _fail(key, "a list without duplicates", value)
    return value


def _device(value: Any, key: str) -> None:
    ok = isinstance(value, str) and (value in ("auto", "cpu", "cuda") or
                                     (value.startswith("cuda:") and value[5:].isdigit()))
    if not ok:
        _fail(key, "auto, cpu, cuda or cuda:N", value)


def _section(params: Mapping, name: str) -> Mapping:
    sec = params.get(name)
    if not isinstance(sec, Mapping):
        _fail(name, "a mapping (section)", sec)
    unknown = sorted(set(sec) - _SECTIONS[name])
    missing = sorted(_SECTIONS[name] - set(sec) - _OPTIONAL)
    if unknown:
        raise ParamsError(f"params.yaml: {name}: unknown key(s) {unknown}; expected {sorted(_SECTIONS[name])}")
    if missing:
        raise ParamsError(f"params.yaml: {name}: missing key(s) {missing}")
    return sec


def pipeline_templates(params: Mapping, *, check_paths: bool = True):
    """The :class:`floss.core.templates.TemplateSet` of ``templates`` (null or absent: CLIP's 80; else a template
    file, relative to the repository root or absolute); a bad value fails naming the key. With
    ``check_paths=False`` a missing file gives None (its M is unknown)."""
    from floss.core.templates import DEFAULT_TEMPLATES, load_templates

    value = params.get("templates")
    if value is None:
        return DEFAULT_TEMPLATES
    if not isinstance(value, str) or not value:
        _fail("templates", "null (CLIP's 80 templates) or the path of a template file (one template with '{}' per "
                           "line)", value)
    path = paths.from_root(value)
    if not path.is_file():
        if check_paths:
            _fail("templates", "an existing template file (relative to the repository root)", str(path))
        return None
    try:
        return load_templates(path)
    except ValueError as err:
        raise ParamsError(f"params.yaml: templates: {err}") from None


def num_templates(params: Mapping, *, check_paths: bool = True) -> int | None:
    """M of the pipeline's template set (None when its file is missing and ``check_paths`` is False)."""
    ts = pipeline_templates(params, check_paths=check_paths)
    return None if ts is None else len(ts)


def metric_plugins(params: Mapping) -> list[str]:
    """``rank.metric_plugins`` (absent: none): ``"module:function"`` strings, README "Your own metric"."""
    value = (params.get("rank") or {}).get("metric_plugins", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        _fail("rank.metric_plugins", "a list of distinct 'module:function' strings (your own metrics)", value)
    return value


def metric_plugin_names(params: Mapping) -> tuple[str, ...]:
    """The metric names ``rank.metric_plugins`` register (importing them, and torch, only when there are any);
    a plug-in that cannot be loaded fails naming the key."""
    plugins = metric_plugins(params)
    if not plugins:
        return ()
    from floss.core.metrics import load_metric_plugins
    try:
        return tuple(load_metric_plugins(plugins, "rank.metric_plugins"))
    except ValueError as err:
        raise ParamsError(f"params.yaml: {err}") from None


def metric_plugin_key(params: Mapping) -> dict:
    """``{"metric_plugins": {spec: source digest}}`` for the rank stage's checkpoints and statistics (empty without
    plug-ins, so those keys stay as they were): an edited plug-in recomputes."""
    plugins = metric_plugins(params)
    if not plugins:
        return {}
    from floss.core.metrics import metric_plugin_digest
    return {"metric_plugins": metric_plugin_digest(plugins, "rank.metric_plugins")}


def validate_params(params: Any, *, check_paths: bool = True) -> dict:
    """Check every key the pipeline reads; return ``params`` (a dict) unchanged. Raises :class:`ParamsError`."""
    if not isinstance(params, Mapping):
        raise ParamsError(f"params.yaml: expected a mapping at the top level, got {type(params).__name__}")
    for key in _REQUIRED:
        if key not in params:
            raise ParamsError(f"params.yaml: {key}: missing (required)")
    profile = _choice(params["profile"], "profile", ("demo", "paper"))
    root = params["data_root"]
    if profile == "paper":
        if not isinstance(root, str) or not root:
            _fail("data_root", "the folder of the datasets (required by profile paper)", root)
        if check_paths and not paths.from_root(root).is_dir():
            _fail("data_root", "an existing folder", str(paths.from_root(root)))
    elif root is not None and not isinstance(root, str):
        _fail("data_root", "null or a folder path", root)

    if "cpu_threads" in params:
        _int(params, "cpu_threads", 0, 1024)
    if "cpu_workers" in params:
        _int(params, "cpu_workers", 0, 1024)
    num_m = num_templates(params, check_paths=check_paths)     # M bounds the expert counts

    a = _section(params, "authors")
    if not isinstance(a["url"], str) or not a["url"].startswith(("http://", "https://")):
        _fail("authors.url", "an http(s) URL", a["url"])
    if a["local"] is not None and (not isinstance(a["local"], str) or not a["local"]):
        _fail("authors.local", "null or a folder path", a["local"])
    if isinstance(a["timeout_s"], bool) or not isinstance(a["timeout_s"], (int, float)) or a["timeout_s"] <= 0:
        _fail("authors.timeout_s", "a positive number of seconds", a["timeout_s"])

    models = params["models"]
    if not isinstance(models, Mapping) or not models:
        _fail("models", "a non-empty mapping model -> list of datasets", models)
    for m, datasets in models.items():
        _choice(m, "models", MODELS)
        _names(datasets, f"models.{m}", RANKING_DATASETS)

    t = _section(params, "transfer")
    _names(t["models"], "transfer.models", [m for m in models if "cityscapes" in models[m]], allow_empty=True)
    _names(t["datasets"], "transfer.datasets", TRANSFER_DATASETS, allow_empty=True)

    ex = _section(params, "extract")
    _choice(ex["protocol"], "extract.protocol", ("authors", "paper"))
    _device(ex["device"], "extract.device")
    _int(ex, "extract.gpus", 1, 64)
    _choice(ex["precision"], "extract.precision", ("auto", "fp32", "fp16"))
    _choice(ex["cache_dtype"], "extract.cache_dtype", ("fp32", "fp16"))
    _int(ex, "extract.workers", 0, 64)
    _int(ex, "extract.images_per_shard", 1)
    _choice(ex["on_bad_image"], "extract.on_bad_image", ("stop", "skip"))
    dirs = ex.get("dataset_dirs", {})
    if not isinstance(dirs, Mapping):
        _fail("extract.dataset_dirs", "a mapping dataset -> folder", dirs)
    for d in dirs:
        _choice(d, "extract.dataset_dirs", RANKING_DATASETS + TRANSFER_DATASETS)
    w = ex["weights"]
    if not isinstance(w, Mapping):
        _fail("extract.weights", "a mapping model -> {backbone, pretrained, checkpoint}", w)
    for m in models:
        entry = w.get(m)
        if not isinstance(entry, Mapping) or set(entry) != {"backbone", "pretrained", "checkpoint"}:
            _fail(f"extract.weights.{m}", "a mapping with exactly backbone, pretrained, checkpoint", entry)
        for k in ("backbone", "pretrained", "checkpoint"):
            if entry[k] is not None and not isinstance(entry[k], str):
                _fail(f"extract.weights.{m}.{k}", "null or a string", entry[k])

    s = _section(params, "synthetic")
    _int(s, "synthetic.seed", 0)
    _int(s, "synthetic.feature_dim", 8, 4096)
    _int(s, "synthetic.planted_per_class", 1, num_m)
    images = s["images"]
    if not isinstance(images, Mapping):
        _fail("synthetic.images", "a mapping dataset -> {train, val}", images)
    needed = {d for ds in models.values() for d in ds} | ({"transfer"} if t["datasets"] else set())
    for d in sorted(needed):
        splits = ("val",) if d == "transfer" else ("train", "val")
        entry = images.get(d)
        if not isinstance(entry, Mapping) or set(entry) != set(splits):
            _fail(f"synthetic.images.{d}", f"a mapping with exactly {', '.join(splits)}", entry)
        for sp in splits:
            _int(entry, f"synthetic.images.{d}.{sp}", 1)

    r = _section(params, "rank")
    _choice(r["source"], "rank.source", ("images", "cache"))
    _names(r["metrics"], "rank.metrics", METRICS + metric_plugin_names(params))
    if "rank_ensemble" in r["metrics"] and not set(ENSEMBLE_MEMBERS) <= set(r["metrics"]):
        _fail("rank.metrics", f"the members of rank_ensemble ({', '.join(ENSEMBLE_MEMBERS)}) beside it", r["metrics"])
    _device(r["device"], "rank.device")
    ev = _section(params, "evaluate")
    _int(ev, "evaluate.n_experts", 1, num_m)
    _choice(ev["metric"], "evaluate.metric", r["metrics"])
    _names(ev["fusions"], "evaluate.fusions", FUSIONS)
    if not isinstance(ev["per_template"], bool):
        _fail("evaluate.per_template", "true or false", ev["per_template"])
    _device(ev["device"], "evaluate.device")
    _validate_notebooks(params, models, num_m)
    if profile == "paper" and check_paths:
        check_paper_inputs(params)
    return dict(params)


def _weights_problem(model: str, entry: Mapping) -> tuple[str, str] | None:
    """(key, message) of the first weights problem of ``model`` that extraction would hit, else None.

    Imports open_clip (paper profile only): the backbone must be an open_clip name or an existing config
    .json, a pretrained tag must belong to it with the same activation (QuickGELU for OpenAI weights) and be in
    the local cache, a weight file must exist, and CLIP-DINOiser needs its head checkpoint."""
    from floss.models.backbone import resolve_backbone, resolve_weights

    key = f"extract.weights.{model}"
    backbone = entry["backbone"] or MATRIX_MODELS[model][1]
    pretrained = entry["pretrained"] or MATRIX_MODELS[model][2]
    if backbone.endswith(".json"):
        backbone = str(paths.from_root(backbone))
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
        pretrained = str(paths.from_root(pretrained))
    try:
        name = resolve_backbone(backbone)
    except (ValueError, FileNotFoundError) as err:
        return f"{key}.backbone", str(err)
    try:
        resolve_weights(name, pretrained)
    except (ValueError, FileNotFoundError) as err:
        return f"{key}.pretrained", str(err)
    if os.path.isfile(pretrained) and (problem := weight_file_problem(pretrained)):
        return f"{key}.pretrained", problem
    checkpoint = entry["checkpoint"]
    if model == "clipdinoiser" and not checkpoint and pretrained != "none":
        return f"{key}.checkpoint", ("CLIP-DINOiser needs its head weights: the authors' "
                                     "checkpoints/clip_dinoiser/model_weights.pth or the original last.pt")
    if checkpoint and not paths.from_root(checkpoint).is_file():
        return f"{key}.checkpoint", f"{paths.from_root(checkpoint)} does not exist"
    if checkpoint and (problem := weight_file_problem(paths.from_root(checkpoint))):
        return f"{key}.checkpoint", problem
    if checkpoint and model != "clipdinoiser":
        return f"{key}.checkpoint", f"only clipdinoiser takes a head checkpoint, {model} received {checkpoint!r}"
    return None


def dataset_folder(params: Mapping, dataset: str) -> Path:
    """``data_root / (extract.dataset_dirs[dataset] or the dataset's usual folder name)``."""
    from floss.data.datasets import get_layout

    folder = params["extract"].get("dataset_dirs", {}).get(dataset) or get_layout(dataset).root_hint
    return paths.from_root(params["data_root"]) / folder


def needed_splits(params: Mapping) -> dict[str, dict[str, bool]]:
    """dataset -> {split: whether its labels are read}: what the paper profile reads from disk (train for ranking,
    unlabelled when ranked straight from the images; val for evaluation)."""
    need: dict[str, dict[str, bool]] = {}
    train_labels = params["rank"]["source"] == "cache"      # a train cache stores labels; ranking never reads them
    for datasets in params["models"].values():
        for d in datasets:
            need.setdefault(d, {}).update(train=train_labels or need.get(d, {}).get("train", False), val=True)
    for d in params["transfer"]["datasets"] if params["transfer"]["models"] else ():
        need.setdefault(d, {})["val"] = True
    return need


def low_data_datasets(params: Mapping) -> list[str]:
    """The datasets of the low-data analysis (Fig. 3) that this run ranks: ``low_data.datasets`` that the
    ``low_data.model`` is run on (a subset of the matrix leaves the others "not run")."""
    low = params.get("low_data") or {}
    ranked = params["models"].get(low.get("model"), [])
    return [d for d in low.get("datasets", []) if d in ranked]


def check_paper_inputs(params: Mapping) -> None:
    """Refuse early what extraction would refuse late: weights (backbone/pretrained pairing, missing files or
    uncached tags, the CLIP-DINOiser head) and dataset folders and split folders/files. Cheap: folders are
    checked, files are not listed (the extract stage checks every image/label pair when it opens a split)."""
    from floss.data.datasets import get_layout

    for m in params["models"]:
        problem = _weights_problem(m, params["extract"]["weights"][m])
        if problem:
            raise ParamsError(f"params.yaml: {problem[0]}: {problem[1]}")
    for d, splits in sorted(needed_splits(params).items()):
        layout = get_layout(d)
        root = dataset_folder(params, d)
        key = f"extract.dataset_dirs.{d}" if d in params["extract"].get("dataset_dirs", {}) else "data_root"
        if not root.is_dir():
            raise ParamsError(f"params.yaml: {key}: expected the {d} dataset folder {root} ({layout.description}; "
                              f"set extract.dataset_dirs.{d} if it lives elsewhere), which does not exist")
        for split in sorted(splits):
            if split not in layout.splits:
                raise ParamsError(f"params.yaml: models: {d} has no {split!r} split (splits: {list(layout.splits)})")
            dirs = layout.splits[split]
            for what, rel in (("image folder", dirs.img_dir), ("label folder", dirs.label_dir if splits[split]
                                                                 else None), ("split file", dirs.split_file)):
                if rel and not (root / rel).exists():
                    raise ParamsError(f"params.yaml: {key}: {d} split {split!r}: the {what} {root / rel} does not "
                                      f"exist (expected {layout.expected_files(split)}; {layout.conversion})")


def _validate_notebooks(params: Mapping, models: Mapping, m: int | None = NUM_TEMPLATES) -> None:
    if "low_data" in params:
        ld = _section(params, "low_data")
        # any known model and dataset: a subset of the matrix (``-S '~models.x'``) leaves the rest "not run"
        _choice(ld["model"], "low_data.model", MODELS)
        _names(ld["datasets"], "low_data.datasets", RANKING_DATASETS)
        sizes = ld["sizes"]
        if not isinstance(sizes, list) or not sizes or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                           for v in sizes) or sizes != sorted(set(sizes)):
            _fail("low_data.sizes", "an increasing list of positive integers", sizes)
        _int(ld, "low_data.seeds", 1)
    if "topn" in params:
        ns = params["topn"]
        if not isinstance(ns, list) or not ns or any(isinstance(v, bool) or not isinstance(v, int)
                                                     or not 1 <= v <= (m or v) for v in ns):
            _fail("topn", f"a non-empty list of integers in 1..{m or 'M'}", ns)
    if "oracle" in params:
        o = _section(params, "oracle")
        n = params["evaluate"]["n_experts"]
        rhos = o["rhos"]
        if not isinstance(rhos, list) or not rhos or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1
                or abs(v * n - round(v * n)) > 1e-9 for v in rhos):
            _fail("oracle.rhos", f"a non-empty list of ratios in [0, 1] that are multiples of 1/{n} "
                  "(evaluate.n_experts)", rhos)
        _int(o, "oracle.seeds", 1)
        if not isinstance(o["ns"], list) or not o["ns"] or any(
                isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= (m or v) for v in o["ns"]):
            _fail("oracle.ns", f"a non-empty list of integers in 1..{m or 'M'}", o["ns"])
    if "qualitative" in params:
        _int(_section(params, "qualitative"), "qualitative.num_images", 1, 50)


def load_params(path: str | os.PathLike | None = None, *, check_paths: bool = True) -> dict:
    """Read and validate params.yaml (default: ``<repo>/params.yaml``)."""
    path = Path(path) if path is not None else paths.ROOT / "params.yaml"
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from err
    return validate_params(params, check_paths=check_paths)
