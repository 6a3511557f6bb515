"""The protocol's fast path: the 80 single-template confusion matrices without rendering 80 full-resolution maps.

* :mod:`~floss.protocol.kernels.argmax` — :func:`~floss.protocol.kernels.argmax.per_template_confusion`
  (reference: classify every template with :func:`floss.protocol.rendering.classify` and count; equal bit for bit,
  ``tests/test_fast_paths.py``);
* :mod:`~floss.protocol.kernels.argmax_geometry` — window-grid geometry, two-tap arithmetic, uniform cells;
* :mod:`~floss.protocol.kernels.argmax_repair` — re-scores near-tied pixels with the renderer's own arithmetic.

May import: :mod:`floss.util`, :mod:`floss.core`, :mod:`floss.protocol.rendering`. Never the protocol package
itself (it calls this one).
"""
