"""samtx: sharpness-aware optimizers as composable optax transforms."""

from samtx.aliases import adasam
from samtx.aliases import amsgrad
from samtx.aliases import friendly_sam
from samtx.aliases import gsam
from samtx.aliases import lightsam
from samtx.aliases import looksam
from samtx.aliases import sam
from samtx.aliases import wsam
from samtx.guards import apply_if_finite
from samtx.moments import LIGHTSAM_VARIANTS
from samtx.moments import lightsam_preconditioner
from samtx.moments import scale_by_adagrad
from samtx.moments import scale_by_adagrad_norm
from samtx.moments import scale_by_adam_uncorrected
from samtx.moments import scale_by_amsgrad
from samtx.moments import ScaleByAdagradNormState
from samtx.moments import ScaleByAdagradState
from samtx.moments import ScaleByAdamUncorrectedState
from samtx.moments import ScaleByAmsgradState
from samtx.msam import msam
from samtx.msam import msam_adamw
from samtx.msam import MSAMState
from samtx.msam import unperturb
from samtx.perturbations import friendly_sam_perturbation
from samtx.perturbations import FriendlySAMState
from samtx.perturbations import gsam_perturbation
from samtx.perturbations import lightsam_perturbation
from samtx.perturbations import looksam_perturbation
from samtx.perturbations import LookSAMState
from samtx.perturbations import PerturbationState
from samtx.perturbations import sam_perturbation
from samtx.perturbations import wsam_perturbation
from samtx.wrappers import lookahead
# related work: GPA, SAF / MESA
from samtx.gpa import eval_params
from samtx.gpa import gpa
from samtx.gpa import GPAState
from samtx.saf import ema_params
from samtx.saf import mesa
from samtx.saf import MESAState
from samtx.saf import saf_memory
from samtx.saf import saf_record
from samtx.saf import saf_targets
from samtx.saf import trajectory_loss
# FGSAM, RAPP (issue 22)
from samtx.aliases import fgsam
from samtx.aliases import fgsam_plus
from samtx.perturbations import fgsam_perturbation
from samtx.perturbations import fgsam_plus_perturbation
from samtx.wrappers import rapp

__version__ = "0.1.0"

# Submodules with heavier imports (flax, plotting, datasets) load on first use,
# so `import samtx` pulls in only jax and optax.
_LAZY_SUBMODULES = ("parallel", "sharpness", "flax", "datasets", "cli")


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    import importlib
    return importlib.import_module(f"samtx.{name}")
  raise AttributeError(f"module 'samtx' has no attribute {name!r}")

__all__ = (
    # perturbations
    "sam_perturbation",
    "lightsam_perturbation",
    "gsam_perturbation",
    "wsam_perturbation",
    "friendly_sam_perturbation",
    "looksam_perturbation",
    "PerturbationState",
    "FriendlySAMState",
    "LookSAMState",
    # adaptive moments
    "scale_by_amsgrad",
    "scale_by_adagrad_norm",
    "scale_by_adagrad",
    "scale_by_adam_uncorrected",
    "lightsam_preconditioner",
    "LIGHTSAM_VARIANTS",
    "ScaleByAmsgradState",
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "ScaleByAdamUncorrectedState",
    # aliases
    "sam",
    "adasam",
    "amsgrad",
    "lightsam",
    "msam",
    "msam_adamw",
    "gsam",
    "wsam",
    "friendly_sam",
    "looksam",
    # guards and wrappers
    "apply_if_finite",
    "lookahead",
    # one-pass helpers
    "MSAMState",
    "unperturb",
    # related work: GPA, SAF / MESA
    "gpa",
    "GPAState",
    "eval_params",
    "trajectory_loss",
    "mesa",
    "MESAState",
    "ema_params",
    "saf_memory",
    "saf_record",
    "saf_targets",
    # FGSAM, RAPP (issue 22)
    "fgsam_perturbation",
    "fgsam_plus_perturbation",
    "fgsam",
    "fgsam_plus",
    "rapp",
)
