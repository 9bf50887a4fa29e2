"""``python -m difflab ...`` is the ``difflab`` command."""
import sys

from difflab.cli import main

sys.exit(main())
