"""The optimizer registry of ``samtx compare``: one entry per optimizer.

An entry says how to build the optimizer from ``(learning_rate, rho)``,
whether its ``update`` needs ``grad_fn``, which tuning grid it uses
(:mod:`samtx.compare.config` holds the grids per model), the fixed settings
that define it, and whether its loss gains a trajectory term (SAF, MESA:
:mod:`samtx.compare.train` adds it). Adding an optimizer is one
:func:`register` line; entries for aliases that this version of samtx does
not have yet are guarded by ``hasattr`` (they appear once the alias exists,
and never as a stand-in).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import optax

import samtx

__all__ = ["Spec", "SPECS", "register", "MOMENTUM", "WEIGHT_DECAY",
           "LOOKSAM_K", "LOOKSAM_ALPHA", "GPA_TRAIN_INTERP",
           "GPA_EVAL_INTERP", "TEMPERATURE", "SAF_LAG"]

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2  # decoupled (AdamW) weight decay, DESIGN.md's msam_adamw default
# LookSAM: the paper's k; alpha = 0.1, not the paper's 0.7, which underfits
# these small models (the reused term, 0.7 n(g), dwarfs SAM's own orthogonal
# part, 0.02-0.14 n(g)); at 0.1 LookSAM trains like SAM (DESIGN.md).
LOOKSAM_K = 5
LOOKSAM_ALPHA = 0.1
# GPA: the official recommendation for AdamW (facebookresearch/optimizers,
# gpa/README: train_interp 0.7, eval_interp 0.9967, about DiLoCo's H = 32).
GPA_TRAIN_INTERP = 0.7
GPA_EVAL_INTERP = 0.9967
# SAF and MESA (Du et al., official code): temperature 5, SAF's lag 3 epochs.
TEMPERATURE = 5.0
SAF_LAG = 3

ANALYSIS_FORM = ("the analysis form of the AdaSAM proof (experimental, not "
                 "Algorithm 1, not recommended)")


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build one optimizer and where its tuning sweep looks.

  Attributes:
    label: name in tables and plots.
    make: ``make(learning_rate, rho) -> optax transform`` (rho ignored by the
      base optimizers).
    two_pass: whether ``update`` needs ``grad_fn``.
    grid: key of the (lr, rho) grid in :data:`samtx.compare.config.GRIDS`.
    family: ``"sgd"``, ``"adaptive"`` or ``"lightsam"`` (plot colours).
    note: a caveat shown in ``--help`` and stored with the results.
    settings: the fixed hyper-parameters that define the method besides
      (lr, rho), as sorted items; stored with the results and part of a run
      record's key, so that changing one retrains instead of resuming.
    trajectory: ``"saf"`` or ``"mesa"``: the loss gains Du et al.'s
      trajectory term with weight ``rho`` (the second axis of the grid is
      lambda); MESA's ``make`` is the base optimizer, which the trainer
      wraps in ``samtx.mesa``. None for every other method.
  """
  label: str
  make: Callable[..., optax.GradientTransformation]
  two_pass: bool
  grid: str
  family: str
  note: str = ""
  settings: Tuple[tuple, ...] = ()
  trajectory: Optional[str] = None


SPECS: Dict[str, Spec] = {}


def register(name: str, label: str, make: Callable, *, two_pass: bool,
             grid: str, family: str, note: str = "",
             settings: Optional[dict] = None,
             trajectory: Optional[str] = None) -> None:
  """Adds an optimizer to :data:`SPECS` (see the module docstring)."""
  SPECS[name] = Spec(label, make, two_pass, grid, family, note,
                     tuple(sorted((settings or {}).items())), trajectory)


def _adasam_on_adam(lr, rho):
  """SAM's perturbation on bias-corrected Adam (AdaSAM minus its base rule)."""
  return optax.chain(samtx.sam_perturbation(rho), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(lr))


def _sam_on_adamw(lr, rho):
  return optax.chain(samtx.sam_perturbation(rho),
                     optax.adamw(lr, weight_decay=WEIGHT_DECAY))


# Baselines (one gradient per step).
register("sgd", "SGD", lambda lr, rho: optax.sgd(lr, momentum=MOMENTUM),
         two_pass=False, grid="sgd", family="sgd")
register("adam", "Adam", lambda lr, rho: optax.adam(lr), two_pass=False,
         grid="adam", family="adaptive")
register("adamw", "AdamW", lambda lr, rho: optax.adamw(
    lr, weight_decay=WEIGHT_DECAY), two_pass=False, grid="adam",
         family="adaptive")
register("amsgrad", "AMSGrad", lambda lr, rho: samtx.amsgrad(lr),
         two_pass=False, grid="adam", family="adaptive",
         note="AdaSAM's base rule: no bias correction, no eps")
# Sharpness-aware.
register("sam", "SAM", lambda lr, rho: samtx.sam(lr, rho, momentum=MOMENTUM),
         two_pass=True, grid="sam", family="sgd")
register("asam", "ASAM", lambda lr, rho: samtx.sam(
    lr, rho, momentum=MOMENTUM, adaptive=True), two_pass=True, grid="asam",
         family="sgd")
register("msam", "MSAM", lambda lr, rho: samtx.msam(
    lr, rho, momentum=MOMENTUM), two_pass=False, grid="msam", family="sgd")
register("adasam", "AdaSAM", lambda lr, rho: samtx.adasam(lr, rho),
         two_pass=True, grid="adasam", family="adaptive")
register("adasam_adam", "SAM+Adam", _adasam_on_adam, two_pass=True,
         grid="adamw_family", family="adaptive",
         note="AdaSAM's perturbation on bias-corrected Adam")
register("sam_adamw", "SAM+AdamW", _sam_on_adamw, two_pass=True,
         grid="adamw_family", family="adaptive",
         settings={"weight_decay": WEIGHT_DECAY})
register("adasam_delayed", "AdaSAM-delayed*", lambda lr, rho: samtx.adasam(
    lr, rho, delayed=True), two_pass=True, grid="adasam", family="adaptive",
         note=ANALYSIS_FORM)
register("lightsam_i", "LightSAM-I", lambda lr, rho: samtx.lightsam(
    lr, rho, variant="adagrad_norm"), two_pass=True, grid="lightsam_i",
         family="lightsam")
register("lightsam_ii", "LightSAM-II", lambda lr, rho: samtx.lightsam(
    lr, rho, variant="adagrad"), two_pass=True, grid="lightsam_ii",
         family="lightsam")
register("lightsam_iii", "LightSAM-III", lambda lr, rho: samtx.lightsam(
    lr, rho, variant="adam"), two_pass=True, grid="lightsam_iii",
         family="lightsam")
# Aliases being written on other branches (DESIGN.md): each entry activates
# as soon as samtx has the alias, and the presets already list MSAM-AdamW
# (its grid is config.GRIDS[...]["msam_adamw"]). Until then it is absent,
# never replaced by a stand-in.
if hasattr(samtx, "msam_adamw"):  # MSAM-AdamW, the lead's branch

  register("msam_adamw", "MSAM-AdamW", lambda lr, rho: samtx.msam_adamw(
      lr, rho, weight_decay=WEIGHT_DECAY), two_pass=False, grid="msam_adamw",
           family="adaptive")


def _sam_family(alias: str, label: str, note: str = "",
                settings: Optional[dict] = None) -> None:
  """Registers a two-pass alias on SGD with momentum, if samtx has it."""
  if hasattr(samtx, alias):
    kwargs = dict(settings or {})
    register(alias, label, lambda lr, rho: getattr(samtx, alias)(
        lr, rho, momentum=MOMENTUM, **kwargs), two_pass=True,
             grid="sam_family",
             family="sgd", note=note, settings=settings)


_LOOKSAM_NOTE = (f"k={LOOKSAM_K}, alpha={LOOKSAM_ALPHA} (the paper's 0.7 "
                 "underfits small models): the second gradient runs on every "
                 f"{LOOKSAM_K}th step only, so a step costs 1 + 1/k = "
                 f"{1 + 1 / LOOKSAM_K:g} gradients on average (grads/step "
                 "counts the passes that ran)")
_LOOKSAM = {"k": LOOKSAM_K, "alpha": LOOKSAM_ALPHA}

_sam_family("gsam", "GSAM")
_sam_family("wsam", "WSAM")
_sam_family("friendly_sam", "Friendly-SAM")
_sam_family("looksam", "LookSAM", note=_LOOKSAM_NOTE, settings=_LOOKSAM)

if hasattr(samtx, "looksam_perturbation"):
  register("looksam_adamw", "LookSAM+AdamW", lambda lr, rho: optax.chain(
      samtx.looksam_perturbation(rho, k=LOOKSAM_K, alpha=LOOKSAM_ALPHA),
      optax.adamw(lr, weight_decay=WEIGHT_DECAY)), two_pass=True,
           grid="adamw_family", family="adaptive", note=_LOOKSAM_NOTE,
           settings={**_LOOKSAM, "weight_decay": WEIGHT_DECAY})

# The related-work systems (DESIGN.md "Related work"), each registered as
# soon as samtx has it. GPA wraps AdamW and is evaluated at
# samtx.eval_params (its x); SAF and MESA add a loss term (the trainer's
# trajectory hook) to SGD with momentum on the CNN and AdamW on the
# transformer.
if hasattr(samtx, "gpa"):
  register("gpa", "GPA-AdamW", lambda lr, rho: samtx.gpa(
      optax.adamw(lr, weight_decay=WEIGHT_DECAY),
      train_interp=GPA_TRAIN_INTERP, eval_interp=GPA_EVAL_INTERP),
           two_pass=False, grid="gpa", family="adaptive",
           note="evaluated at samtx.eval_params (the averaged point x)",
           settings={"train_interp": GPA_TRAIN_INTERP,
                     "eval_interp": GPA_EVAL_INTERP,
                     "weight_decay": WEIGHT_DECAY})

_TRAJECTORY = {"temperature": TEMPERATURE}
if all(hasattr(samtx, f) for f in ("trajectory_loss", "saf_memory",
                                   "saf_record", "saf_targets")):
  register("saf", "SAF", lambda lr, rho: optax.sgd(lr, momentum=MOMENTUM),
           two_pass=False, grid="trajectory", family="sgd",
           note=(f"SGD with momentum + lambda (the rho column) x the "
                 f"trajectory loss against the logits recorded {SAF_LAG} "
                 f"epochs earlier, temperature {TEMPERATURE:g}"),
           settings={**_TRAJECTORY, "lag": SAF_LAG}, trajectory="saf")
if all(hasattr(samtx, f) for f in ("trajectory_loss", "mesa", "ema_params")):
  _MESA_NOTE = ("+ lambda (the rho column) x the trajectory loss against an "
                "EMA teacher (horizon a tenth of the run, evaluation mode, EMA "
                f"of the BatchNorm statistics too), temperature "
                f"{TEMPERATURE:g}")
  register("mesa", "MESA", lambda lr, rho: optax.sgd(lr, momentum=MOMENTUM),
           two_pass=False, grid="trajectory", family="sgd",
           note="SGD with momentum " + _MESA_NOTE, settings=_TRAJECTORY,
           trajectory="mesa")
  register("mesa_adamw", "MESA-AdamW", lambda lr, rho: optax.adamw(
      lr, weight_decay=WEIGHT_DECAY), two_pass=False, grid="trajectory",
           family="adaptive", note="AdamW " + _MESA_NOTE,
           settings={**_TRAJECTORY, "weight_decay": WEIGHT_DECAY},
           trajectory="mesa")
