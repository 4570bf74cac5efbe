"""``python -m dynarank.cli`` (and ``torchrun -m dynarank.cli``): the ``dynarank`` command."""

import sys

from .main import main

sys.exit(main())
