"""``python -m sparsify.cli``: the ``sparsify`` command."""

import sys

from sparsify.cli import main

sys.exit(main())
