"""``python -m mathrl`` = the ``mathrl`` command; what ``torchrun -m mathrl train ...`` runs on every rank."""

import sys

from mathrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
