"""Layer 3, data on disk: dataset readers, the feature cache, the demo's synthetic source, the authors' files.

* :mod:`~floss.data.datasets` — readers for the eight datasets in their standard (mmseg) layouts and for a user's
  image folder; folders are walked once per real folder (:mod:`~floss.data.datasets.walk`).
* :mod:`~floss.data.cache` (reader), :mod:`~floss.data.cache_writer`, :mod:`~floss.data.cache_manifest` — the
  feature cache: the contract between the GPU half (extraction) and everything else, keyed by code, weights,
  inputs and settings.
* :mod:`~floss.data.synthetic` — a synthetic source in the real cache format with planted experts (the demo).
* :mod:`~floss.data.authors` — the authors' published rankings and per-template IoU (URL or local folder).

May import: :mod:`floss.util`, :mod:`floss.core`, :mod:`floss.models` (protocol settings, preprocessing).
"""
