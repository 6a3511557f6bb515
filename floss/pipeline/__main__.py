"""``python -m floss.pipeline``: the DVC stages' entry point (see :func:`floss.pipeline.main`)."""
import sys

from floss.pipeline import main

sys.exit(main())
