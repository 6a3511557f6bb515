"""Layer 0, the foundation: facts and helpers every other layer shares, with no floss import above this package.

* :mod:`~floss.util.provenance` — the identities that key every reuse (code digest, package versions, weights,
  per-image inputs) and ``floss_version``; ``python -m floss.util.provenance`` writes the DVC ``code`` stage's file.
* :mod:`~floss.util.io` — atomic writes (temp file + rename, umask-respecting modes).
* :mod:`~floss.util.paths` — the repository root and every pipeline path, resolved from it (never from the cwd).
* :mod:`~floss.util.open_clip_data` — open_clip's plain-data constants (templates, CLIP mean/std) without
  importing open_clip.
* :mod:`~floss.util.threads`, :mod:`~floss.util.distributed` — torch thread pools; torchrun helpers.
* :mod:`~floss.util.memory` — glibc malloc settings the entry points apply (freed tensors' memory kept for reuse).

May import: the standard library and torch. Nothing from floss outside ``floss.util``.
"""
