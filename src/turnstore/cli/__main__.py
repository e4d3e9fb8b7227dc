"""``python -m turnstore.cli``: the same as the ``turnstore`` command."""

import sys

from turnstore.cli.main import main

sys.exit(main())
