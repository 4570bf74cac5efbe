"""The ``dynarank`` command (console script ``dynarank = "dynarank.cli:main"``)."""

from .main import main

__all__ = ["main"]
