"""``samtx compare``: which optimizer, for which model, at what cost.

The main job of samtx, laid out like flax's ``examples/lm1b``:

- :mod:`~samtx.compare.config`: workloads, grids, presets and tuned values.
- :mod:`~samtx.compare.data`: the embedded datasets (MNIST-1D, digits, a
  character-level text corpus from the Python standard library).
- :mod:`~samtx.compare.models`: MLP, BatchNorm CNN and causal transformer
  (Flax NNX) and their functional form.
- :mod:`~samtx.compare.optimizers`: the optimizer registry.
- :mod:`~samtx.compare.train`: the vmapped, scanned training loop and step
  timing.
- :mod:`~samtx.compare.tune`: grids, winners, ``--hparams`` files and
  ``--lr``/``--rho`` overrides.
- :mod:`~samtx.compare.records`: per-run records (resumable jobs).
- :mod:`~samtx.compare.report`: tables, plots and JSON.
- :mod:`~samtx.compare.experiment`: the ``compare`` and ``sensitivity`` jobs.
- :mod:`~samtx.compare.cli`: the command line (parsing only).
"""
