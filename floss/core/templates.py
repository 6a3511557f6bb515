"""Prompt templates: CLIP's 80 ImageNet templates (the default, open_clip's order, ids 0..79) and any other set.

The 80 strings are *derived* from open_clip's ``OPENAI_IMAGENET_TEMPLATES`` (lambdas in open_clip 3.x, strings in
2.x) instead of being retyped, so the ids match the authors' rankings files (protocol §1.1, Appendix A).

Any template set (:class:`TemplateSet`, read from a file by :func:`load_templates`) works everywhere the 80 do:
M >= 1 templates, template id = position. One rule for the file format, here: UTF-8, one template per line with
exactly one ``{}``, surrounding whitespace stripped, blank lines and ``#`` comment lines ignored, duplicates refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
from pathlib import Path
from typing import Iterable

from floss.util.open_clip_data import data_module

logger = logging.getLogger(__name__)

#: the number of ImageNet templates (M in the paper; any template set may hold another M, see TemplateSet)
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


# --- any template set -----------------------------------------------------------------------------------------

class TemplateSet(tuple):
    """An ordered set of M >= 1 prompt templates (format strings with exactly one ``{}``); template id = position.

    A tuple of the texts (so it compares equal to any tuple of the same texts and works wherever a list of
    templates is accepted), plus ``source`` (where it came from, for messages), :attr:`digest` (what keys every
    cached artifact it determines) and :attr:`is_default` (CLIP's 80, :data:`DEFAULT_TEMPLATES`). Build one from a
    file with :func:`load_templates`, or from texts: ``TemplateSet(["a photo of a {}.", "art of the {}."])``.
    """

    def __new__(cls, texts: Iterable[str], source: str | None = None) -> "TemplateSet":
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise TypeError(f"templates: expected a list of format strings, received {type(texts).__name__}")
        texts = tuple(texts)
        where = source or "templates"
        if not texts:
            raise ValueError(f"{where}: expected at least one template, received none")
        seen: dict[str, int] = {}
        for i, text in enumerate(texts):
            problem = template_problem(text)
            if problem:
                raise ValueError(f"{where}: template {i}: {problem}")
            if text in seen:
                raise ValueError(f"{where}: template {i} {text!r} repeats template {seen[text]}; expected distinct "
                                 "templates")
            seen[text] = i
        self = super().__new__(cls, texts)
        self.source = source or ("CLIP's 80 ImageNet templates" if texts == IMAGENET_TEMPLATES else "templates")
        return self

    def __reduce__(self):
        return type(self), (tuple(self), self.source)

    @property
    def is_default(self) -> bool:
        """True for CLIP's 80 ImageNet templates in open_clip's order (the authors' set)."""
        return tuple(self) == IMAGENET_TEMPLATES

    @property
    def digest(self) -> str:
        """``"sha256:<hex>"`` of the texts in order (the key of features, text embeddings, statistics)."""
        return "sha256:" + hashlib.sha256(json.dumps(list(self), ensure_ascii=False).encode()).hexdigest()

    def prompt(self, template_id: int, class_name: str) -> str:
        """The prompt of template ``template_id`` for ``class_name`` (plain substitution)."""
        tid = check_template_id("template_id", template_id, len(self))
        if not isinstance(class_name, str):
            raise TypeError(f"class_name: expected a str, received {type(class_name).__name__}")
        return self[tid].format(class_name)

    def __repr__(self) -> str:
        return f"TemplateSet({len(self)} templates from {self.source})"


def template_problem(text) -> str | None:
    """What is wrong with one template text (None if it is usable): a str with exactly one ``{}`` and no other
    brace, not blank."""
    if not isinstance(text, str):
        return f"expected a str, received {type(text).__name__}"
    if not text.strip():
        return "expected a template text, received a blank one"
    if text.count("{}") != 1 or text.replace("{}", "", 1).count("{") or text.replace("{}", "", 1).count("}"):
        return f"expected exactly one '{{}}' (where the class name goes) and no other brace, received {text!r}"
    return None


#: CLIP's 80 ImageNet templates as a :class:`TemplateSet` (the default everywhere; ids 0..79 in open_clip's order)
DEFAULT_TEMPLATES = TemplateSet(IMAGENET_TEMPLATES)


def load_templates(path: str | os.PathLike | None) -> TemplateSet:
    """Read a template file; ``None`` gives CLIP's 80 (:data:`DEFAULT_TEMPLATES`).

    Format: UTF-8 text (a byte-order mark is allowed), one template per line, each with exactly one ``{}`` where
    the class name goes and no other brace. Leading and trailing whitespace of a line is removed; blank lines and
    lines whose first non-blank character is ``#`` are ignored. Template id = order among the templates kept
    (0-based). Duplicates, an empty file and undecodable bytes are refused with ``file:line`` and what was
    expected.
    """
    if path is None:
        return DEFAULT_TEMPLATES
    if isinstance(path, TemplateSet):
        return path
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"templates: template file {p} does not exist (expected a text file, one template "
                                "with '{}' per line)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{p}:{line}: expected UTF-8 text, received undecodable bytes ({err.reason})") from None
    texts, lines = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        problem = template_problem(line)
        if problem:
            raise ValueError(f"{p}:{number}: {problem}")
        if line in lines:
            raise ValueError(f"{p}:{number}: expected distinct templates, received {line!r} again (first on line "
                             f"{lines[line]})")
        lines[line] = number
        texts.append(line)
    if not texts:
        raise ValueError(f"{p}: expected at least one template (one per line, with '{{}}'), received none")
    logger.info("%d templates from %s", len(texts), p)
    return TemplateSet(texts, source=str(p))


def as_template_set(templates) -> TemplateSet:
    """``None`` -> CLIP's 80; a path -> :func:`load_templates`; a list of texts -> :class:`TemplateSet`."""
    if templates is None or isinstance(templates, TemplateSet):
        return load_templates(templates)
    if isinstance(templates, (str, os.PathLike)):
        return load_templates(templates)
    return TemplateSet(templates)


def templates_key(templates) -> str | None:
    """The fingerprint entry of a template set: None for CLIP's 80 (so every key of the default stays what it
    was), else its :attr:`TemplateSet.digest`."""
    ts = as_template_set(templates)
    return None if ts.is_default else ts.digest
