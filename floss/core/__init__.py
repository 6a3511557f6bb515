"""Layer 1, the paper's algorithm (FLOSS, Eqs. 5-11) on tensors, independent of any model, dataset or file layout.

Read in this order:

* :mod:`~floss.core.templates` — CLIP's 80 ImageNet templates (ids 0..79, open_clip's order), the default, and
  any other template set (:class:`~floss.core.templates.TemplateSet`, :func:`~floss.core.templates.load_templates`);
  :mod:`~floss.core.classes` — class names and the query-word ↔ class maps;
  :mod:`~floss.core.text` — text classifiers: the averaged ``W_CLIP`` (Eq. 2) and the expert classifiers.
* :mod:`~floss.core.stats` — :class:`~floss.core.stats.TemplateStats`: streaming per-(template, class)
  statistics over unlabeled images (entropy, Eq. 5; the other metrics of Eqs. 9-11, registered in
  :mod:`~floss.core.metrics`); :mod:`~floss.core.stats_io` saves and loads them.
* :mod:`~floss.core.rankings` — rankings files (the authors' JSON schema) and the expert rule (Eq. 6, top-N with
  the "all templates" fallback); oracle / true / mixed experts for the analyses.
* :mod:`~floss.core.fusion` — Eq. 7: fusing the K experts' maps (and Table 4's variants).
* :mod:`~floss.core.evaluation` — the confusion matrix and mIoU as mmseg computes them.
* :mod:`~floss.core.kernels` — the accelerations of ``TemplateStats`` (fused per-pixel kernels, exact separable
  resizing); each equals a plain reference the tests compare it with (docs/architecture.md lists them).

May import: :mod:`floss.util`, torch, numpy. Never models, data, protocol, the CLI or the pipeline.
"""
