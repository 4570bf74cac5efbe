"""``python -m dynarank`` (and ``torchrun -m dynarank``): the ``dynarank`` command, as ``python -m dynarank.cli``.

The entry point of the application layer, though it sits at the package's top (tests/test_architecture.py counts it
with the CLI): importing ``dynarank`` never runs it.
"""

import sys

from .cli.main import main

sys.exit(main())
