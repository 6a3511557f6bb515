"""Class names per dataset, the NACLIP spellings/synonyms, and the query-word <-> class maps.

Data typed from the protocol (FLOSS-protocol.md Appendix B, §1.6, §6):

* MaskCLIP / CLIP-DINOiser prompt the dataset METAINFO names, which are also the keys of their rankings JSON
  (ADE20K keeps the authors' ``'bed '`` with a trailing space: it is a JSON key, and CLIP's tokenizer makes
  the prompt identical anyway).
* NACLIP prompts the names with spaces removed (``trafficlight``); its rankings keys are those too. On VOC20 it
  prompts 30 query words: ``ship`` (boat), ``table`` (dining table), ``person`` + 6 synonyms and 5 words for
  ``tvmonitor``; class scores are the max over a class's query words.
* SCLIP's class files are byte-identical to NACLIP's (OVSS-models-more §0): same queries and rankings keys.
* ClearCLIP (and GEM, evaluated under ClearCLIP's re-run protocol) use the same unspaced names, but VOC20 has no
  synonyms: one query per class (``person``, ``tvmonitor``), ``ship`` and ``table`` kept for boat / dining
  table. Rankings keys: the unspaced names, as NACLIP.
* The driving transfer sets (ACDC, BDD, Mapillary) use the Cityscapes names and the Cityscapes rankings.
"""
from __future__ import annotations

import logging
import unicodedata
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

# --- METAINFO names (= MaskCLIP/CLIP-DINOiser prompts and rankings keys), protocol Appendix B -------------

_CITYSCAPES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign', 'vegetation',
    'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle',
)

_PASCALVOC20 = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'dining table',
    'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train', 'tvmonitor',
)

_PASCALCO59 = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle', 'building',
    'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup', 'curtain', 'dog',
    'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike',
    'mountain', 'mouse', 'person', 'plate', 'platform', 'potted plant', 'road', 'rock', 'sheep', 'shelves',
    'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall',
    'water', 'window', 'wood',
)

_ADE20K = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher',
    'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)

_COCOSTUFF = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush', 'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush',
    'cabinet', 'cage', 'cardboard', 'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds',
    'counter', 'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble',
    'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower', 'fog', 'food-other', 'fruit',
    'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house', 'leaves', 'light', 'mat', 'metal',
    'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net', 'paper', 'pavement', 'pillow', 'plant-other',
    'plastic', 'platform', 'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug',
    'salad', 'sand', 'sea', 'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone',
    'straw', 'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick',
    'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood', 'water-other',
    'waterdrops', 'window-blind', 'window-other', 'wood',
)

#: datasets that have rankings files of their own (the authors' ``--dataset`` values)
RANKING_DATASETS: tuple[str, ...] = ("cityscapes", "pascalvoc20", "pascalco59", "ade20k", "cocostuff")
#: evaluation-only driving sets -> the dataset whose names and rankings they reuse (protocol §5, Table 3)
TRANSFER_DATASETS: dict[str, str] = {name: "cityscapes" for name in (
    "acdc_night", "acdc_fog", "acdc_rain", "acdc_snow", "bdd", "mapillary")}
#: every dataset name known to :data:`CLASS_NAMES`
DATASETS: tuple[str, ...] = RANKING_DATASETS + tuple(TRANSFER_DATASETS)
#: the models whose class-name conventions are known; ``None`` in the functions = plain METAINFO names
MODELS: tuple[str, ...] = ("maskclip", "clipdinoiser", "naclip", "sclip", "clearclip", "gem", "resclip", "scclip",
                           "gem_quoted")
#: models prompting (and keying their rankings with) the names without spaces
UNSPACED_MODELS: tuple[str, ...] = ("naclip", "sclip", "clearclip", "gem", "resclip", "scclip", "gem_quoted")
#: models whose VOC20 queries are NACLIP's synonym lines (the others of UNSPACED_MODELS: one word per class)
#: (ResCLIP and SC-CLIP ship NACLIP's / SCLIP's class files byte for byte, OVSS-models-2025 §0)
VOC20_SYNONYM_MODELS: tuple[str, ...] = ("naclip", "sclip", "resclip", "scclip")

_METAINFO = {"cityscapes": _CITYSCAPES, "pascalvoc20": _PASCALVOC20, "pascalco59": _PASCALCO59,
             "ade20k": _ADE20K, "cocostuff": _COCOSTUFF}

#: ``CLASS_NAMES[dataset]`` -> list of the K class names (METAINFO spelling, the evaluation class order)
CLASS_NAMES: dict[str, list[str]] = {
    **{name: list(names) for name, names in _METAINFO.items()},
    **{name: list(_METAINFO[source]) for name, source in TRANSFER_DATASETS.items()},
}

# NACLIP's VOC20 query lines (``configs/naclip/cls_voc20.txt``, one tuple per class, in class order). Synonyms
# keep their inner spaces: only single names are written without spaces in NACLIP's files.
_NACLIP_VOC20_QUERIES = (
    ("aeroplane",), ("bicycle",), ("bird",), ("ship",), ("bottle",), ("bus",), ("car",), ("cat",), ("chair",),
    ("cow",), ("table",), ("dog",), ("horse",), ("motorbike",),
    ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
     "person in jacket"),
    ("pottedplant",), ("sheep",), ("sofa",), ("train",),
    ("television monitor", "tv monitor", "monitor", "television", "screen"),
)

# ClearCLIP's ``cls_voc20.txt`` (also GEM under ClearCLIP's re-run): no synonyms, boat/dining table renamed.
_CLEARCLIP_VOC20_QUERIES = (
    "aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog", "horse",
    "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _check_dataset(dataset) -> str:
    if not isinstance(dataset, str):
        raise TypeError(f"dataset: expected a str, received {type(dataset).__name__}")
    if dataset not in CLASS_NAMES:
        raise ValueError(f"dataset: unknown dataset {dataset!r}; known datasets are {', '.join(DATASETS)}")
    return dataset


def _check_model(model) -> str | None:
    if model is not None and model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; known models are {', '.join(MODELS)} "
                         "(or None for the plain METAINFO names)")
    return model


def rankings_dataset(dataset: str) -> str:
    """The dataset whose rankings file ``dataset`` uses (itself, or ``cityscapes`` for the driving sets)."""
    return TRANSFER_DATASETS.get(_check_dataset(dataset), dataset)


def class_names(dataset: str) -> list[str]:
    """A fresh copy of ``CLASS_NAMES[dataset]`` (with a clear error for an unknown dataset)."""
    return list(CLASS_NAMES[_check_dataset(dataset)])


def naclip_name(name: str) -> str:
    """NACLIP's spelling of a METAINFO name: spaces removed (``'traffic light'`` -> ``'trafficlight'``)."""
    return name.replace(" ", "")


def class_key(name: str) -> str:
    """The identity of a class name: Unicode NFC, lower case, every whitespace removed (``'Traffic Light'`` ->
    ``'trafficlight'``). CLIP's tokenizer lower-cases and NACLIP spells names without spaces, so two names with one
    key get the same classifier: class files refuse them, and rankings keys are matched to class names by it."""
    return "".join(unicodedata.normalize("NFC", name).lower().split())


def _by_key(names: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        key = class_key(name)
        if key in out:
            raise ValueError(f"{what}: classes {out[key]!r} and {name!r} are one class (names are compared ignoring "
                             "case and whitespace)")
        out[key] = name
    return out


def match_rankings_classes(rankings: Mapping, class_names: Sequence[str], source) -> list[str]:
    """The keys of ``rankings["classes"]`` in the order of ``class_names``, matched by :func:`class_key` (so the
    NACLIP spelling ``trafficlight`` matches ``traffic light``); missing, unknown or ambiguous classes raise."""
    keys = list(rankings.get("classes", {}))
    by_key = _by_key(keys, f"--rankings: {source}")
    wanted = _by_key(class_names, "the classes matched to the rankings")
    missing = [n for n in class_names if class_key(n) not in by_key]
    extra = [k for k in keys if class_key(k) not in wanted]
    if missing or extra:
        raise ValueError(f"--rankings: the classes of {source} do not match the feature cache's classes; missing "
                         f"{missing[:8]}, unknown {extra[:8]} (rankings for {rankings.get('dataset')!r}, "
                         f"{len(keys)} classes; cache has {len(class_names)})")
    return [by_key[class_key(n)] for n in class_names]


def ranking_name(name: str, model: str | None = None) -> str:
    """The rankings-JSON key of class ``name`` for ``model`` (unspaced for :data:`UNSPACED_MODELS`)."""
    return naclip_name(name) if _check_model(model) in UNSPACED_MODELS else name


def query_groups(dataset: str, model: str | None = None) -> list[tuple[str, ...]]:
    """Per class (class order), the query words the model prompts for it."""
    _check_dataset(dataset)
    if _check_model(model) not in UNSPACED_MODELS:
        return [(name,) for name in CLASS_NAMES[dataset]]
    if dataset == "pascalvoc20":
        if model in VOC20_SYNONYM_MODELS:
            return [tuple(group) for group in _NACLIP_VOC20_QUERIES]
        return [(name,) for name in _CLEARCLIP_VOC20_QUERIES]
    return [(naclip_name(name),) for name in CLASS_NAMES[dataset]]


def query_names(dataset: str, model: str | None = None) -> tuple[list[str], list[int]]:
    """``(queries, query_to_class)``: the Q prompted words and, for each, the index of its class.

    MaskCLIP / CLIP-DINOiser (and ``model=None``): Q = K, identity map. NACLIP and SCLIP on VOC20: Q = 30.
    """
    queries: list[str] = []
    query_to_class: list[int] = []
    for k, group in enumerate(query_groups(dataset, model)):
        queries.extend(group)
        query_to_class.extend([k] * len(group))
    return queries, query_to_class


def ranking_keys(dataset: str, model: str | None = None) -> list[str]:
    """The class keys (in class order) of the authors' rankings JSON of ``model`` for ``dataset``.

    Transfer sets give the Cityscapes keys (they use the Cityscapes rankings file).
    """
    return [ranking_name(name, model) for name in CLASS_NAMES[rankings_dataset(dataset)]]
