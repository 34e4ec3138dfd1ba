"""``python -m dtokd`` runs the ``dtokd`` command."""

import sys

from dtokd.cli import main

sys.exit(main())
