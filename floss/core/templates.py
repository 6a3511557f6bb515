"""The 80 ImageNet prompt templates of CLIP, as format strings, in open_clip's order (template ids 0..79).

The strings are *derived* from open_clip's ``OPENAI_IMAGENET_TEMPLATES`` (lambdas in open_clip 3.x, strings in
2.x) instead of being retyped, so the ids match the authors' rankings files (protocol §1.1, Appendix A).
"""
from __future__ import annotations

import logging
import numbers
from typing import Iterable

from floss.util.open_clip_data import data_module

logger = logging.getLogger(__name__)

#: the number of ImageNet templates (M in the paper)
NUM_TEMPLATES = 80


def _as_format_string(template) -> str:
    # open_clip >= 2.2x stores ``lambda c: f"a photo of a {c}."``; calling it with "{}" gives the format string
    text = template("{}") if callable(template) else template
    if not isinstance(text, str) or text.count("{}") != 1:
        raise RuntimeError(f"open_clip template {template!r} did not yield a format string with one '{{}}'")
    return text


#: tuple of the 80 format strings, e.g. ``IMAGENET_TEMPLATES[0] == "a bad photo of a {}."``
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(
    _as_format_string(t) for t in data_module("zero_shot_metadata").OPENAI_IMAGENET_TEMPLATES)
if len(IMAGENET_TEMPLATES) != NUM_TEMPLATES:  # pragma: no cover - guards against an open_clip change
    raise RuntimeError(f"open_clip provides {len(IMAGENET_TEMPLATES)} ImageNet templates, expected {NUM_TEMPLATES}")


def check_template_id(name: str, template_id, num_templates: int = NUM_TEMPLATES) -> int:
    """Return ``template_id`` as int after checking it is an integer in ``[0, num_templates)``."""
    if isinstance(template_id, bool) or not isinstance(template_id, numbers.Integral):
        raise TypeError(f"{name}: expected an integer template id, received {template_id!r} "
                        f"({type(template_id).__name__})")
    if not 0 <= int(template_id) < num_templates:
        raise ValueError(f"{name}: expected a template id in [0, {num_templates - 1}], received {template_id}")
    return int(template_id)


def check_template_ids(name: str, template_ids: Iterable, num_templates: int = NUM_TEMPLATES,
                       allow_empty: bool = False) -> list[int]:
    """Check a collection of distinct template ids; returns them as a list of ints (order kept)."""
    if isinstance(template_ids, (str, bytes)) or not isinstance(template_ids, Iterable):
        raise TypeError(f"{name}: expected a list of template ids, received {type(template_ids).__name__}")
    ids = [check_template_id(f"{name}[{i}]", t, num_templates) for i, t in enumerate(template_ids)]
    if not ids and not allow_empty:
        raise ValueError(f"{name}: expected at least one template id, received an empty list")
    if len(set(ids)) != len(ids):
        dup = sorted({t for t in ids if ids.count(t) > 1})
        raise ValueError(f"{name}: expected distinct template ids, received duplicates {dup}")
    return ids


def prompt(template_id: int, class_name: str) -> str:
    """The prompt of template ``template_id`` for ``class_name`` (plain substitution, as the authors).

    >>> prompt(0, "road")
    'a bad photo of a road.'
    """
    tid = check_template_id("template_id", template_id)
    if not isinstance(class_name, str):
        raise TypeError(f"class_name: expected a str, received {type(class_name).__name__}")
    return IMAGENET_TEMPLATES[tid].format(class_name)
