"""Fidelity round 3: run-time negative rho, errors that name working fixes,
and tests that kill one-line bugs the earlier suites let through.

Each test here failed on the code before its fix (or, for the mutation
killers, on the mutated code); the numbers come from independent NumPy
transcriptions or from optax itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from samtx import _common
from tests import helpers
from tests import reference
from tests.optimizers import CASES

WITH_RHO = sorted(name for name, case in CASES.items() if "rho" in case.kwargs)


def _loss(p):
  return sum(jnp.sum(jnp.sin(x) * x ** 2 + 0.3 * x) for x in p)


def _params():
  return [jnp.array([[-1.0, 0.4, 2.0], [0.7, -0.2, 1.3]]),
          jnp.array([0.5, -1.5])]


def _run_injected(case, rho_values, steps=4):
  """``steps`` jitted updates of the injected alias, with
  ``state.hyperparams['rho']`` set to ``rho_values[t]`` before step t."""
  opt = optax.inject_hyperparams(case.factory)(**case.kwargs)
  grad_fn = jax.grad(_loss)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(grad_fn(params), state, params,
                                grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = opt.init(params)
  out = []
  for rho in rho_values[:steps]:
    state.hyperparams["rho"] = jnp.full_like(state.hyperparams["rho"], rho)
    params, state = step(params, state)
    out.append(params)
  return out


# ------------------------------------------------ item 2: rho below zero
@pytest.mark.parametrize("name", WITH_RHO)
def test_injected_negative_rho_is_rejected_eagerly(name):
  case = CASES[name]
  opt = optax.inject_hyperparams(case.factory)(**{**case.kwargs, "rho": -0.1})
  with pytest.raises(ValueError, match=r"rho must lie in \[0.0, inf\]"):
    opt.init(_params())


def test_injected_negative_rho_set_after_init_raises_in_an_eager_update():
  opt = optax.inject_hyperparams(samtx.sam)(learning_rate=0.1, rho=0.05)
  params = _params()
  state = opt.init(params)
  state.hyperparams["rho"] = jnp.full_like(state.hyperparams["rho"], -0.1)
  grads = jax.grad(_loss)(params)
  with pytest.raises(ValueError, match="rho must lie in"):
    opt.update(grads, state, params, grad_fn=jax.grad(_loss))


@pytest.mark.parametrize("name", WITH_RHO)
def test_injected_negative_rho_under_jit_acts_as_rho_zero(name):
  """Under jit the value is a tracer: it cannot raise, it is clamped."""
  case = CASES[name]
  negative = _run_injected(case, [0.05, -0.1, -3.0, 0.05])
  clamped = _run_injected(case, [0.05, 0.0, 0.0, 0.05])
  for got, want in zip(negative, clamped):
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # and the comparison can fail: the steps with rho = 0.05 did perturb
  unperturbed = _run_injected(case, [0.0, 0.0, 0.0, 0.0])
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for step_a, step_b in zip(negative, unperturbed)
             for a, b in zip(step_a, step_b))


@pytest.mark.parametrize("name", WITH_RHO)
def test_rho_schedule_going_negative_is_clamped(name):
  case = CASES[name]
  falling = lambda t: 0.05 - 0.03 * t          # 0.05, 0.02, -0.01, -0.04
  floored = lambda t: jnp.maximum(0.05 - 0.03 * t, 0.0)
  params = _params()
  got, _ = helpers.run(case.make(rho=falling), _loss, params, 4)
  want, _ = helpers.run(case.make(rho=floored), _loss, params, 4)
  for a, b in zip(got, want):
    for g, w in zip(a, b):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_rho_at_clamps_arrays_and_schedules_but_keeps_python_numbers():
  count = jnp.asarray(3)
  assert _common.rho_at(0.05, count) == 0.05
  assert isinstance(_common.rho_at(0.05, count), float)
  assert float(_common.rho_at(jnp.asarray(-0.2), count)) == 0.0
  assert float(_common.rho_at(lambda t: 0.1 - 0.1 * t, count)) == 0.0
  assert float(_common.rho_at(lambda t: 0.1 * t, count)) == pytest.approx(0.3)
