"""Deprecated location of the embedded datasets: see :mod:`samtx.compare.data`.

Kept so that ``from samtx import datasets`` keeps working.
"""

from samtx.compare.data import *  # noqa: F401,F403
from samtx.compare.data import __all__  # noqa: F401
