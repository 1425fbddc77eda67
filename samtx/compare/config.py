"""Every default of ``samtx compare`` in one place: workloads, grids, presets.

A *workload* is a (dataset, model) pair with its training settings. Two
presets name the workloads and settings of a job:

- ``"demo"`` (the default, ``make demo``): digits-MLP, MNIST-1D-CNN and
  text-transformer with a few optimizers, 3 seeds, short schedules, the
  committed tuned values (no sweep). A few minutes on 2 CPU cores.
- ``"full"``: the committed results: every workload with its optimizers,
  lr/rho tuned on the validation split with 3 seeds per grid point, then 5
  evaluation seeds.

Command-line flags override any preset value.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

__all__ = ["Workload", "WORKLOADS", "GRIDS", "PRESETS", "TUNED",
           "EARLIER_SWEEPS", "workload_name"]


@dataclasses.dataclass(frozen=True)
class Workload:
  """A (dataset, model) pair and how it trains.

  Attributes:
    dataset: dataset name (:data:`samtx.compare.data.DATASETS`).
    model: model name (:data:`samtx.compare.models.MODELS`).
    model_options: keyword arguments of the model class, as sorted items.
    epochs: training epochs (full preset).
    batch_size: minibatch size.
    eval_examples: training examples used for the per-epoch train loss and
      the final train metrics (None: all).
    hessian_examples: training examples of the loss whose top Hessian
      eigenvalue and perturbed-loss gap are measured (None: eval_examples).
    train_examples: train on the first this many training examples only
      (None: all); bounds the cost of an epoch.
    timing_steps, timing_repeats: step-time measurement (full preset).
    schedule: ``"constant"`` learning rate, or ``"cosine"``: linear warm-up
      over the first 5% of the steps, then cosine decay to a tenth of the
      peak (:func:`samtx.compare.train.lr_shape`).
    vectorize: train the runs of one batch with ``jax.vmap`` (True) or one
      after the other inside one program with ``jax.lax.map`` (False: on CPU
      a vmapped step costs about twice as much per run for the transformer
      and three times for the CNN, whose convolutions become grouped ones).
    trajectory_start: the epoch from which SAF's and MESA's trajectory loss
      is on (Du et al. start at epoch 5).
  """
  dataset: str
  model: str
  model_options: Tuple[tuple, ...] = ()
  epochs: int = 30
  batch_size: int = 128
  eval_examples: Optional[int] = None
  hessian_examples: Optional[int] = None
  train_examples: Optional[int] = None
  timing_steps: int = 100
  timing_repeats: int = 15
  schedule: str = "constant"
  vectorize: bool = True
  trajectory_start: int = 5

  @property
  def name(self) -> str:
    return workload_name(self.dataset, self.model)

  @property
  def options(self) -> dict:
    return dict(self.model_options)


def workload_name(dataset: str, model: str) -> str:
  """``"<dataset>-<model>"``, the results folder of a workload."""
  return f"{dataset}-{model}"


# Sizes are chosen for 2 shared CPU cores (the committed runs): small, but
# the architecture of the papers' settings (BatchNorm CNN, pre-LN causal
# transformer). The CNN trains 30 epochs (780 steps) so that label noise is
# memorised when nothing prevents it; the transformer 8 epochs of its corpus
# (2232 steps), enough for AdamW to reach about 2.2 bits per character.
_CNN = dict(epochs=30, hessian_examples=512, timing_steps=50,
            timing_repeats=9, schedule="cosine", vectorize=False)
WORKLOADS: Dict[str, Workload] = {w.name: w for w in (
    Workload("mnist1d", "mlp", (("hidden", (100, 100)),)),
    Workload("digits", "mlp", (("hidden", (128,)),)),
    Workload("mnist1d", "cnn", (("channels", (16, 32)), ("kernel", 5),
                                ("dropout", 0.1)), **_CNN),
    Workload("digits", "cnn", (("channels", (16, 32)), ("kernel", 3),
                               ("dropout", 0.1)), **_CNN),
    Workload("text", "transformer", (("width", 64), ("depth", 2),
                                     ("heads", 4)),
             epochs=8, batch_size=16, eval_examples=512, hessian_examples=32,
             timing_steps=20, timing_repeats=9, schedule="cosine",
             vectorize=False, trajectory_start=1),
)}


@dataclasses.dataclass(frozen=True)
class Relative:
  """Learning rates of a sweep as multiples of another optimizer's tuned one.

  The anchor is tuned first (same workload and noise level); its winning
  learning rate times each factor gives the grid, so that a sharpness-aware
  method is tuned around its base optimizer's learning rate.

  Attributes:
    anchor: optimizer whose tuned learning rate is the centre.
    factors: multipliers (e.g. ``(1/3, 1)``: one step below, and equal).
  """
  anchor: str
  factors: Tuple[float, ...]


_THIRD = 1.0 / 3.0

# model -> grid key -> (learning rates, rhos). Grid keys come from
# samtx.compare.optimizers.Spec.grid. For SAF and MESA the second axis is
# the weight lambda of the trajectory loss (they have no rho).
_SMALL_NETS = {
    "sgd": ((0.01, 0.03, 0.1, 0.3), (0.0,)),
    "adam": ((3e-4, 1e-3, 3e-3, 1e-2), (0.0,)),
    "sam": ((0.03, 0.1, 0.3), (0.02, 0.05, 0.15)),
    "sam_family": ((0.03, 0.1, 0.3), (0.02, 0.05, 0.15)),
    "asam": ((0.03, 0.1, 0.3), (0.2, 0.5, 1.5)),
    "msam": ((0.03, 0.1, 0.3), (0.1, 0.3, 1.0)),
    "adasam": ((3e-4, 1e-3, 3e-3), (0.02, 0.05, 0.15)),
    "lightsam_i": ((0.3, 1.0, 3.0, 10.0), (0.1, 0.3, 1.0)),
    "lightsam_ii": ((0.003, 0.01, 0.03, 0.1), (0.003, 0.01, 0.03)),
    "lightsam_iii": ((3e-4, 1e-3, 3e-3, 1e-2), (3e-4, 1e-3, 3e-3)),
    "msam_adamw": ((3e-4, 1e-3, 3e-3), (0.1, 0.3, 1.0)),
    "adamw_family": ((3e-4, 1e-3, 3e-3), (0.02, 0.05, 0.15)),
    "gpa": ((3e-4, 1e-3, 3e-3, 1e-2), (0.0,)),
    "trajectory": (Relative("sgd", (1.0,)), (0.3, 0.8)),
}
# The BatchNorm CNN under label noise: SGD's learning rate first; then SAM
# and MSAM one step below and at SGD's learning rate, the wider SAM family
# (LookSAM, Friendly-SAM, GSAM, WSAM), SAF and MESA at it, each with two
# rhos (or lambdas).
_CNN_GRIDS = {
    **_SMALL_NETS,
    "sgd": ((0.03, 0.1, 0.3), (0.0,)),
    "adam": ((1e-3, 3e-3, 1e-2), (0.0,)),
    "sam": (Relative("sgd", (_THIRD, 1.0)), (0.05, 0.15)),
    "sam_family": (Relative("sgd", (1.0,)), (0.05, 0.15)),
    "asam": ((0.1, 0.3), (0.5, 1.5)),
    "msam": (Relative("sgd", (_THIRD, 1.0)), (0.3, 1.0)),
    "adasam": ((3e-3, 1e-2), (0.02, 0.1)),
    "msam_adamw": ((3e-3, 1e-2), (0.1, 0.3)),
}
# The transformer (2 shared CPU cores: the sweep is most of the protocol's
# time): AdamW's (and Adam's) learning rate first; then every other method
# at AdamW's learning rate with two values of its own hyper-parameter
# (rho, or MESA's lambda), except where the base rule or the step has
# another scale: AdaSAM (AMSGrad: no bias correction) one step below and at
# it, with rho 0.05; GPA (its step is 1 - 0.9967 * 0.7 = 0.30 of AdamW's) at
# it and one step above.
_TRANSFORMER_GRIDS = {
    **_SMALL_NETS,
    "sgd": ((0.3, 1.0, 3.0), (0.0,)),
    "adam": ((3e-3, 1e-2, 3e-2), (0.0,)),
    "sam": ((0.3, 1.0), (0.05, 0.2)),
    "msam": ((0.3, 1.0), (0.3, 1.0)),
    "adasam": (Relative("adamw", (_THIRD, 1.0)), (0.05,)),
    "adamw_family": (Relative("adamw", (1.0,)), (0.02, 0.1)),
    "msam_adamw": (Relative("adamw", (1.0,)), (0.1, 0.3)),
    "gpa": (Relative("adamw", (1.0, 3.0)), (0.0,)),
    "trajectory": (Relative("adamw", (1.0,)), (0.3, 0.8)),
}
GRIDS: Dict[str, Dict[str, tuple]] = {
    "mlp": _SMALL_NETS, "cnn": _CNN_GRIDS, "transformer": _TRANSFORMER_GRIDS}

# The committed sets: every method on the MLP (cheap), the papers' methods
# for each architecture elsewhere (2 shared CPU cores). Names samtx does not
# have yet (the related-work systems) are skipped until it does.
_CNN_SET = ("sgd", "sam", "msam", "looksam", "friendly_sam", "saf", "mesa")
_MLP_SET = ("sgd", "adamw", "amsgrad", "sam", "asam", "msam", "adasam",
            "adasam_adam", "msam_adamw", "lightsam_i", "lightsam_ii",
            "lightsam_iii", "adasam_delayed", "gsam", "wsam", "friendly_sam",
            "looksam")
_TRANSFORMER_SET = ("adam", "adamw", "msam_adamw", "sam_adamw", "adasam_adam",
                    "adasam", "looksam_adamw", "gpa", "mesa_adamw")

PRESETS: Dict[str, dict] = {
    "demo": {
        "workloads": ("digits-mlp", "mnist1d-cnn", "text-transformer"),
        "optimizers": {"digits-mlp": ("sgd", "sam", "msam"),
                       "mnist1d-cnn": ("sgd", "sam"),
                       "text-transformer": ("adam", "sam_adamw")},
        "epochs": {"digits-mlp": 20, "mnist1d-cnn": 4, "text-transformer": 1},
        "noise": {},  # clean labels only
        "seeds": 3,
        "timing_steps": 10,
        "timing_repeats": 5,
        "hessian_iters": 10,
        "tune": False,
        "verify_corpus": False,
    },
    "full": {
        "workloads": ("digits-mlp", "mnist1d-cnn", "text-transformer"),
        "optimizers": {"digits-mlp": _MLP_SET, "mnist1d-cnn": _CNN_SET,
                       "text-transformer": _TRANSFORMER_SET},
        "epochs": {},  # each workload's own
        # The CNN under label noise only (compute budget): the clean-label
        # regime is the MLP's.
        "noise": {"digits-mlp": (0.0, 0.25),
                  "mnist1d-cnn": (0.25, 0.5)},
        # 5 evaluation seeds; 3 for the transformer (compute budget).
        "seeds": {"text-transformer": 3},
        "default_seeds": 5,
        "tune": True,
        "tune_seeds": 3,
        "hessian_iters": 20,
        "verify_corpus": True,
    },
}

# (lr, rho) chosen by the committed sweeps (benchmarks/results/compare/
# <workload>/tuning.json): workload -> noise -> optimizer -> (lr, rho). A
# noise level not listed uses the nearest one at which the optimizer is
# tuned. The mnist1d-mlp values are those of the earlier MLP-only sweep (1 seed per grid point,
# benchmarks/results/compare/mnist1d/tuning.json). Noise levels that the
# current protocol does not sweep (the CNN's clean labels) keep an earlier
# sweep's winners, named in EARLIER_SWEEPS.
TUNED: Dict[str, Dict[float, Dict[str, tuple]]] = {
    "mnist1d-mlp": {
        0.0: {"sgd": (0.1, 0.0), "amsgrad": (0.003, 0.0),
              "sam": (0.1, 0.15), "asam": (0.1, 1.5), "adasam": (0.003, 0.15),
              "adasam_delayed": (0.0003, 0.05), "lightsam_i": (10.0, 1.0),
              "lightsam_ii": (0.1, 0.01), "lightsam_iii": (0.003, 0.001),
              "msam": (0.1, 0.3)},
        0.25: {"sgd": (0.01, 0.0), "amsgrad": (0.001, 0.0),
               "sam": (0.03, 0.15), "asam": (0.03, 1.5),
               "adasam": (0.001, 0.05), "adasam_delayed": (0.0003, 0.15),
               "lightsam_i": (3.0, 0.1), "lightsam_ii": (0.03, 0.01),
               "lightsam_iii": (0.001, 0.001), "msam": (0.03, 1.0)},
    },
    "digits-mlp": {
        0.0: {"sgd": (0.3, 0.0), "adamw": (0.01, 0.0),
              "amsgrad": (0.003, 0.0), "sam": (0.3, 0.15), "asam": (0.3, 0.5),
              "msam": (0.3, 1.0), "adasam": (0.003, 0.15),
              "adasam_adam": (0.003, 0.15), "lightsam_i": (3.0, 0.1),
              "lightsam_ii": (0.03, 0.003), "lightsam_iii": (0.003, 0.0003),
              "adasam_delayed": (0.003, 0.02), "msam_adamw": (0.003, 0.1),
              "gsam": (0.3, 0.15), "wsam": (0.1, 0.05),
              "friendly_sam": (0.3, 0.15), "looksam": (0.3, 0.15)},
        0.25: {"sgd": (0.03, 0.0), "adamw": (0.001, 0.0),
               "amsgrad": (0.001, 0.0), "sam": (0.03, 0.15),
               "asam": (0.03, 1.5), "msam": (0.1, 1.0),
               "adasam": (0.001, 0.02), "adasam_adam": (0.003, 0.15),
               "lightsam_i": (10.0, 1.0), "lightsam_ii": (0.03, 0.003),
               "lightsam_iii": (0.001, 0.001), "adasam_delayed": (0.001, 0.15),
               "msam_adamw": (0.003, 1.0), "gsam": (0.03, 0.15),
               "wsam": (0.03, 0.05), "friendly_sam": (0.03, 0.15),
               "looksam": (0.03, 0.05)},
    },
    "mnist1d-cnn": {
        0.0: {"sgd": (0.1, 0.0), "adamw": (0.01, 0.0), "sam": (0.1, 0.15),
              "msam": (0.1, 0.3), "adasam": (0.003, 0.02),
              "msam_adamw": (0.01, 0.3)},
        0.25: {"sgd": (0.03, 0.0), "sam": (0.03, 0.15), "msam": (0.03, 1.0),
               "looksam": (0.03, 0.15), "friendly_sam": (0.03, 0.15),
               "saf": (0.03, 0.8), "mesa": (0.03, 0.8)},
        0.5: {"sgd": (0.3, 0.0), "sam": (0.1, 0.15), "msam": (0.1, 1.0),
              "looksam": (0.3, 0.05), "friendly_sam": (0.3, 0.05),
              "saf": (0.3, 0.8), "mesa": (0.3, 0.8)},
    },
    "text-transformer": {
        0.0: {"adam": (0.01, 0.0), "adamw": (0.01, 0.0),
              "msam_adamw": (0.01, 0.3), "sam_adamw": (0.01, 0.02),
              "adasam_adam": (0.01, 0.02), "adasam": (0.00333333, 0.05),
              "looksam_adamw": (0.01, 0.02), "gpa": (0.03, 0.0),
              "mesa_adamw": (0.01, 0.3)},
    },
}

# Workloads whose TUNED values (or those of the noise levels named) come
# from an earlier protocol's sweep (its tuning.json is in the git history at
# the named commit's parent), until the current protocol's full run commits
# its own: what `make demo` and runs without --tune use meanwhile.
EARLIER_SWEEPS: Dict[str, str] = {
    "mnist1d-cnn": "clean labels (noise 0): the 10-epoch clean-label sweep"
                   " (removed in 725c618)",
}

# Workloads without committed tuned values for an optimizer borrow those of
# the same model on the other dataset, then fall back to the grid's centre
# (samtx.compare.tune.resolve_hparams); a run says which it used.
BORROW: Dict[str, str] = {"digits-cnn": "mnist1d-cnn",
                          "mnist1d-mlp": "digits-mlp"}
