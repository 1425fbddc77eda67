"""Every samtx alias under test, once: the list the generic suites iterate.

Each entry names a factory and the keyword arguments to build it with, so a
suite can also rebuild it through ``optax.inject_hyperparams``. ``two_pass``
says whether ``update`` needs ``grad_fn``. The arguments are chosen so each
optimizer converges on the small targets of ``test_common_suite.py``.
"""

import dataclasses
from typing import Any, Callable, Dict

import optax

import samtx


# Wrappers around a base optimizer, as factories of the base's learning rate
# (so the schedule and inject_hyperparams checks reach every number).
def gpa_adam(learning_rate, train_interp, eval_interp):
  return samtx.gpa(optax.adam(learning_rate), train_interp=train_interp,
                   eval_interp=eval_interp)


def gpa_sam(learning_rate, rho, train_interp, eval_interp, axis_name=None):
  return samtx.gpa(samtx.sam(learning_rate, rho=rho, axis_name=axis_name),
                   train_interp=train_interp, eval_interp=eval_interp)


def mesa_sgd(learning_rate, momentum, decay):
  return samtx.mesa(optax.sgd(learning_rate, momentum=momentum), decay=decay)


def mesa_sam(learning_rate, rho, decay, axis_name=None):
  return samtx.mesa(samtx.sam(learning_rate, rho=rho, axis_name=axis_name),
                    decay=decay)


@dataclasses.dataclass(frozen=True)
class Case:
  factory: Callable[..., Any]
  kwargs: Dict[str, Any]
  two_pass: bool

  def make(self, **overrides):
    return self.factory(**{**self.kwargs, **overrides})


CASES = {
    "sam": Case(samtx.sam, dict(learning_rate=0.05, rho=0.05), True),
    "sam_momentum": Case(
        samtx.sam, dict(learning_rate=0.02, rho=0.05, momentum=0.9), True),
    "sam_nesterov": Case(samtx.sam, dict(
        learning_rate=0.02, rho=0.05, momentum=0.9, nesterov=True), True),
    "asam": Case(samtx.sam, dict(
        learning_rate=0.05, rho=0.05, adaptive=True, eta=0.01), True),
    "adasam": Case(samtx.adasam, dict(learning_rate=0.01, rho=0.02), True),
    "adasam_delayed": Case(samtx.adasam, dict(
        learning_rate=0.01, rho=0.02, delayed=True), True),
    "amsgrad": Case(samtx.amsgrad, dict(learning_rate=0.01), False),
    "amsgrad_delayed": Case(
        samtx.amsgrad, dict(learning_rate=0.01, delayed=True), False),
    "lightsam_I": Case(samtx.lightsam, dict(
        learning_rate=1.0, rho=0.05, variant="adagrad_norm"), True),
    "lightsam_II": Case(samtx.lightsam, dict(
        learning_rate=1.0, rho=0.05, variant="adagrad"), True),
    "lightsam_III": Case(samtx.lightsam, dict(
        learning_rate=0.01, rho=0.02, variant="adam"), True),
    "msam": Case(samtx.msam, dict(learning_rate=0.02, rho=0.05), False),
    "msam_adamw": Case(samtx.msam_adamw, dict(
        learning_rate=0.01, rho=0.02, weight_decay=0.0), False),
    "gsam": Case(samtx.gsam, dict(learning_rate=0.05, rho=0.05, alpha=0.4),
                 True),
    "gsam_adaptive_momentum": Case(samtx.gsam, dict(
        learning_rate=0.02, rho=0.05, alpha=0.4, momentum=0.9,
        adaptive=True), True),
    "wsam": Case(samtx.wsam, dict(learning_rate=0.02, rho=0.05, gamma=0.9),
                 True),
    "wsam_adaptive_momentum": Case(samtx.wsam, dict(
        learning_rate=0.01, rho=0.05, gamma=0.9, momentum=0.9,
        adaptive=True), True),
    "friendly_sam": Case(samtx.friendly_sam, dict(
        learning_rate=0.05, rho=0.02, sigma=1.0, lmbda=0.9), True),
    "friendly_sam_adaptive_momentum": Case(samtx.friendly_sam, dict(
        learning_rate=0.02, rho=0.02, sigma=1.0, lmbda=0.9, momentum=0.9,
        adaptive=True), True),
    "looksam": Case(samtx.looksam, dict(
        learning_rate=0.05, rho=0.05, k=2, alpha=0.7), True),
    "looksam_momentum": Case(samtx.looksam, dict(
        learning_rate=0.02, rho=0.05, k=5, alpha=0.7, momentum=0.9), True),
    # Related work: the wrappers. Every generic property applies to them
    # (convergence is checked at samtx.eval_params, GPA's x); the
    # norm_axis_name check skips them because these factories take none
    # (their bases' own checks run above). Both need params: GPA's x and
    # MESA's teacher are built from them.
    "gpa_adam": Case(gpa_adam, dict(
        learning_rate=0.01, train_interp=0.7, eval_interp=0.9), False),
    "gpa_sam": Case(gpa_sam, dict(
        learning_rate=0.05, rho=0.05, train_interp=0.7, eval_interp=0.9), True),
    "mesa_sgd": Case(mesa_sgd, dict(
        learning_rate=0.02, momentum=0.9, decay=0.7), False),
    "mesa_sam": Case(mesa_sam, dict(learning_rate=0.05, rho=0.05, decay=0.7),
                     True),
    # issue 22. The suite's grad_fn is the gradient of the same loss, so
    # FGSAM runs here as a two-pass rule (lam h + (1 - lam) g).
    "sam_unnormalized": Case(samtx.sam, dict(
        learning_rate=0.05, rho=0.05, normalize=False), True),
    "asam_unnormalized_momentum": Case(samtx.sam, dict(
        learning_rate=0.02, rho=0.02, normalize=False, adaptive=True,
        eta=0.01, momentum=0.9), True),
    "fgsam": Case(samtx.fgsam, dict(learning_rate=0.01, rho=0.05, lam=0.3),
                  True),
    "fgsam_weight_decay": Case(samtx.fgsam, dict(
        learning_rate=0.01, rho=0.05, lam=0.7, weight_decay=5e-4), True),
    # graph_grad_fn, the suite's loss too, comes with every update.
    "fgsam_plus": Case(samtx.fgsam_plus, dict(
        learning_rate=0.01, rho=0.05, k=2, alpha=0.1, lam=0.3), True),
}

NEEDS_PARAMS = {name for name, case in CASES.items() if case.two_pass} | {
    "msam_adamw", "gpa_adam", "mesa_sgd"}
