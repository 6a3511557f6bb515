"""The core's fast paths, kept apart from the algorithm they accelerate; none is needed to read the paper's method.

* :mod:`~floss.core.kernels.stats` — one image's per-(template, class) pixel statistics for
  :class:`floss.core.stats.TemplateStats` (reference: the per-template loop in ``tests/test_stats.py``).
* :mod:`~floss.core.kernels.fused` — fused exact argmax / entropy / MaNo / ITI per pixel (reference: the
  unfused torch expressions, bit for bit).
* :mod:`~floss.core.kernels.interp` — bilinear resizing as separable two-tap filters and row-band upsampling
  (reference: ``F.interpolate``, bit for bit).

docs/architecture.md ("Fast paths and their references") gives the test proving each equal to its reference and the
measured speed-up. May import: :mod:`floss.util`, :mod:`floss.core.metrics` (the metric registry), torch.
"""
