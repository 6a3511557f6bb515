"""``python -m floss``: the command line (floss.cli)."""
import sys

from floss.cli import main

sys.exit(main())
