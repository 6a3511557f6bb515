"""Text classifiers from per-template embeddings: averaged W_CLIP (Eq. 2) and expert classifiers (protocol §1.5).

Everything here is model-agnostic: :func:`template_embeddings` only needs a callable
``encode_text(list[str]) -> Tensor [n, D]`` (a model adapter provides it). The embeddings tensor ``[M, Q, D]``
(template × query word × dim, each row L2-normalised) is what the feature cache stores once per cache; every
classifier is then a cheap weighted mean of its rows.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from floss.core.checks import check_finite, check_tensor
from floss.core.templates import IMAGENET_TEMPLATES, check_template_ids

logger = logging.getLogger(__name__)

#: embeddings whose norm is below this are rejected (an encoder returning zeros is a bug, not a direction)
_MIN_NORM = 1e-12


def _check_names(names) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names: expected a list of class/query names, received {type(names).__name__}")
    if len(names) == 0:
        raise ValueError("names: expected at least one name, received an empty list")
    bad = [i for i, n in enumerate(names) if not isinstance(n, str)]
    if bad:
        raise TypeError(f"names: expected strings, received non-strings at positions {bad[:10]}")
    return list(names)


def _check_templates(templates) -> list[str]:
    if isinstance(templates, str) or not isinstance(templates, Sequence) or len(templates) == 0:
        raise ValueError(f"templates: expected a non-empty list of format strings, received {templates!r:.80}")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"templates[{i}]: expected a format string with exactly one '{{}}', received {t!r}")
    return list(templates)


@torch.no_grad()
def template_embeddings(encode_text: Callable[[list[str]], torch.Tensor], names: Sequence[str],
                        templates: Sequence[str] = IMAGENET_TEMPLATES, batch_size: int = 256,
                        device: torch.device | str | None = None, progress: bool = False) -> torch.Tensor:
    """Encode every (template, name) prompt and L2-normalise each embedding.

    Args:
        encode_text: ``encode_text(prompts) -> Tensor [len(prompts), D]`` (raw text features).
        names: the Q query words (class names or NACLIP synonyms), e.g. from ``floss.core.classes.query_names``.
        templates: M format strings (default: the 80 ImageNet templates, ids 0..79).
        batch_size: prompts per ``encode_text`` call.
        device: where the result lives (default: where ``encode_text`` returns it).
        progress: show a tqdm bar over batches (auto-disabled when not a TTY).

    Returns:
        float32 tensor ``[M, Q, D]``: ``out[m, q] = normalize(encode_text([templates[m].format(names[q])]))``.
    """
    if not callable(encode_text):
        raise TypeError(f"encode_text: expected a callable list[str] -> Tensor, received {type(encode_text).__name__}")
    names = _check_names(names)
    templates = _check_templates(templates)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, received {batch_size!r}")
    prompts = [t.format(n) for t in templates for n in names]  # template-major: reshapes to [M, Q]
    chunks = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="text prompts", disable=None if progress else True):
        batch = prompts[start:start + batch_size]
        out = encode_text(batch)
        check_tensor("encode_text output", out, ndim=2, floating=True)
        if out.shape[0] != len(batch) or (chunks and out.shape[1] != chunks[0].shape[1]):
            want = len(batch) if not chunks else f"{len(batch)}, {chunks[0].shape[1]}"
            raise ValueError(f"encode_text output: expected shape [{want}, D] for {len(batch)} prompts, "
                             f"received {list(out.shape)}")
        check_finite("encode_text output", out)
        out = out.float()
        norms = out.norm(dim=-1)
        if bool((norms < _MIN_NORM).any()):
            i = int(torch.nonzero(norms < _MIN_NORM)[0])
            raise ValueError(f"encode_text output: received a zero embedding for prompt {batch[i]!r}")
        chunks.append(out / norms[:, None])
    emb = torch.cat(chunks).reshape(len(templates), len(names), -1)
    return emb if device is None else emb.to(device)


def _check_embeddings(emb) -> torch.Tensor:
    check_tensor("emb", emb, ndim=3, floating=True)
    if min(emb.shape) == 0:
        raise ValueError(f"emb: expected a non-empty [M, Q, D] tensor, received shape {list(emb.shape)}")
    return emb


def _check_renormalize(renormalize) -> bool:
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected True or False, received {renormalize!r}")
    return renormalize


def averaged_classifier(emb: torch.Tensor, templates: Sequence[int] | None = None,
                        renormalize: bool = True) -> torch.Tensor:
    """W_CLIP (Eq. 2): mean over templates of the unit embeddings, ``[M, Q, D] -> [Q, D]``.

    ``templates`` restricts the mean to those template ids (default: all M). ``renormalize=False`` keeps the
    plain mean, as the authors' MaskCLIP / CLIP-DINOiser fusion-mode fallback (protocol §1.5, §9.2).
    """
    _check_embeddings(emb)
    _check_renormalize(renormalize)
    if templates is not None:
        ids = check_template_ids("templates", templates, num_templates=emb.shape[0])
        emb = emb[torch.tensor(ids, device=emb.device)]
    mean = emb.mean(dim=0)
    return F.normalize(mean, dim=-1) if renormalize else mean


def expert_classifiers(emb: torch.Tensor, experts: Sequence[Sequence[int]],
                       renormalize: bool = True) -> torch.Tensor:
    """One full Q-way classifier per expert: ``e_j^(k) = mean_{m in experts[k]} emb[m, j]`` (protocol §1.5).

    Args:
        emb: ``[M, Q, D]`` per-template unit embeddings.
        experts: E lists of template ids (one per class, or per query word for NACLIP VOC20, see
            :func:`expand_experts_to_queries`).
        renormalize: re-normalise each e_j^(k) (paper, NACLIP) or keep the plain mean (authors' MaskCLIP /
            CLIP-DINOiser).

    Returns:
        ``[E, Q, D]`` in ``emb``'s dtype and device.
    """
    _check_embeddings(emb)
    _check_renormalize(renormalize)
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence) or len(experts) == 0:
        raise ValueError("experts: expected a non-empty list of template-id lists (one per expert), "
                         f"received {experts!r:.80}")
    num_templates = emb.shape[0]
    weights = torch.zeros(len(experts), num_templates, dtype=torch.float64)
    for k, ids in enumerate(experts):
        ids = check_template_ids(f"experts[{k}]", ids, num_templates=num_templates)
        weights[k, ids] = 1.0 / len(ids)
    # one matmul instead of K gathers: [E, M] x [M, Q*D], accumulated in float64 and rounded once (the same bits on
    # every CPU, whatever GEMM kernel its instruction set selects)
    wide = (weights.to(emb.device) @ emb.reshape(num_templates, -1).double()).to(emb.dtype)
    out = wide.reshape(len(experts), *emb.shape[1:])
    return F.normalize(out, dim=-1) if renormalize else out


def expand_experts_to_queries(experts_per_class: Sequence[Sequence[int]],
                              query_to_class: Sequence[int]) -> list[list[int]]:
    """Give every query word its class's experts (the authors' ``_apply_quick_and_dirty_fix`` for NACLIP VOC20).

    ``experts_per_class[k]`` are class k's template ids; ``query_to_class[q]`` is the class of query q. Returns Q
    lists; synonyms of one class share the same templates (so they produce identical expert maps).
    """
    if isinstance(experts_per_class, (str, bytes)) or not isinstance(experts_per_class, Sequence):
        raise TypeError(f"experts_per_class: expected a list of template-id lists, received "
                        f"{type(experts_per_class).__name__}")
    if isinstance(query_to_class, (str, bytes)) or not isinstance(query_to_class, Sequence) or not query_to_class:
        raise ValueError(f"query_to_class: expected a non-empty list of class indices, received {query_to_class!r:.80}")
    num_classes = len(experts_per_class)
    bad = [q for q, k in enumerate(query_to_class)
           if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_classes]
    if bad:
        raise ValueError(f"query_to_class: expected class indices in [0, {num_classes - 1}] "
                         f"(len(experts_per_class) = {num_classes}), received invalid entries at queries {bad[:10]}")
    missing = sorted(set(range(num_classes)) - set(query_to_class))
    if missing:
        raise ValueError(f"query_to_class: every class needs at least one query word; classes {missing[:10]} have none")
    return [list(experts_per_class[k]) for k in query_to_class]
