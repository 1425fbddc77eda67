"""The ``samtx`` console script: ``samtx compare`` and ``samtx sensitivity``.

A thin entry point (``samtx = "samtx.cli:main"``, ``python -m samtx.cli``);
the job lives in :mod:`samtx.compare`: models, data, training loop, tuning,
report and argument parsing each in their own module.
"""

from samtx.compare.cli import build_parser
from samtx.compare.cli import main
from samtx.compare.config import TUNED
from samtx.compare.optimizers import SPECS

__all__ = ["build_parser", "main", "SPECS", "TUNED"]

if __name__ == "__main__":
  main()
