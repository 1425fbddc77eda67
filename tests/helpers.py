"""JAX-side fixtures shared by the tests: the reference problem as a pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests import reference

SHAPES = [(3, 4), (4,), (), (2, 1, 3)]


def problem_and_loss(dtype, seed=0):
  """The reference problem and the same loss written in jnp."""
  shapes = [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[2]]
  problem = reference.Problem(shapes, seed)
  # Tree leaf order (sorted keys): a_weight, b_bias, c_block.kernel, c_block.scale.
  def tree_of(leaves):
    a, b, k, s = (jnp.asarray(x, dtype) for x in leaves)
    return {"a_weight": a, "b_bias": b, "c_block": {"kernel": k, "scale": s}}

  consts = [tree_of(problem.a), tree_of(problem.c), tree_of(problem.d)]

  def loss(params):
    terms = jax.tree.map(
        lambda x, a, c, d: jnp.sum(a * x ** 4 / 4 + c * x ** 2 / 2 + d * x),
        params, *consts)
    return sum(jax.tree.leaves(terms))

  return problem, loss, tree_of(problem.x0), tree_of


def leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def gradient_fns(grad_fn):
  """The extra arguments the tests pass to every update: ``grad_fn``, and the
  graph network's gradient function FGSAM+ also needs (here the same loss;
  every other optimizer ignores it)."""
  return {"grad_fn": grad_fn, "graph_grad_fn": grad_fn}


def make_step(opt, loss):
  """A jitted training step that hands grad_fn to the optimizer."""
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(params, state):
    grads = grad_fn(params)
    updates, state = opt.update(grads, state, params, **gradient_fns(grad_fn))
    return optax.apply_updates(params, updates), state

  return step


def run(opt, loss, params, steps):
  step = make_step(opt, loss)
  state = opt.init(params)
  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(params)
  return trajectory, state


def tolerances(dtype):
  return ({"rtol": 1e-10, "atol": 1e-12} if dtype == jnp.float64
          else {"rtol": 3e-5, "atol": 3e-6})


def assert_close_to_reference(trajectory, ref_trajectory, dtype):
  assert len(trajectory) == len(ref_trajectory)
  for t, (got, want) in enumerate(zip(trajectory, ref_trajectory)):
    for g, w in zip(leaves(got), want):
      np.testing.assert_allclose(g, w, err_msg=f"step {t}", **tolerances(dtype))
