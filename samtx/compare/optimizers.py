"""The optimizer registry of ``samtx compare``: one entry per optimizer.

An entry says how to build the optimizer from ``(learning_rate, rho)``,
whether its ``update`` needs ``grad_fn``, and which tuning grid it uses
(:mod:`samtx.compare.config` holds the grids per model). Adding an optimizer
is one :func:`register` line; entries for aliases that this version of samtx
does not have yet are guarded by ``hasattr`` (they appear once the alias
exists, and never as a stand-in).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import optax

import samtx

__all__ = ["Spec", "SPECS", "register", "MOMENTUM", "WEIGHT_DECAY"]

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2  # decoupled (AdamW) weight decay, DESIGN.md's msam_adamw default

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
  """
  label: str
  make: Callable[..., optax.GradientTransformation]
  two_pass: bool
  grid: str
  family: str
  note: str = ""


SPECS: Dict[str, Spec] = {}


def register(name: str, label: str, make: Callable, *, two_pass: bool,
             grid: str, family: str, note: str = "") -> None:
  """Adds an optimizer to :data:`SPECS` (see the module docstring)."""
  SPECS[name] = Spec(label, make, two_pass, grid, family, note)


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
         grid="adasam", family="adaptive",
         note="AdaSAM's perturbation on bias-corrected Adam")
register("sam_adamw", "SAM+AdamW", _sam_on_adamw, two_pass=True,
         grid="adasam", family="adaptive")
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


def _sam_family(alias: str, label: str, note: str = "") -> None:
  """Registers a two-pass alias on SGD with momentum, if samtx has it."""
  if hasattr(samtx, alias):
    register(alias, label, lambda lr, rho: getattr(samtx, alias)(
        lr, rho, momentum=MOMENTUM), two_pass=True, grid="sam", family="sgd",
             note=note)


_sam_family("gsam", "GSAM")
_sam_family("wsam", "WSAM")
_sam_family("friendly_sam", "Friendly-SAM")
_sam_family("looksam", "LookSAM",
            note="k=5: the second gradient runs on every 5th step only, so a"
            " step costs 1 + 1/k = 1.2 gradients on average; the grads/step"
            " column counts gradient calls in the traced program, where"
            " the second pass is traced more than once (to type its"
            " loop), so it overstates LookSAM")
