"""``python -m attnmem`` = the ``attnmem`` command (also what ``torchrun -m attnmem`` runs)."""

import sys

from attnmem.cli import main

if __name__ == "__main__":
    sys.exit(main())
