"""FGSAM: the official step transcribed in NumPy, rho = 0, limits, errors.

The generic properties (jit, inject_hyperparams, dtypes, complex, MultiSteps,
...) run over ``samtx.fgsam`` in ``test_common_suite.py`` (there ``grad_fn``
is the gradient of the same loss). Here the two losses differ, as they do in
FGSAM: ``g`` is the gradient of one loss (the graph network's), ``grad_fn``
the gradient of another that shares the weights (the peer MLP's).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers
from tests import reference

STEPS = 8
LR, RHO, LAM = 0.02, 0.07, 0.3


def _two_losses(dtype):
  """The graph loss (seed 0) and a peer loss on the same leaves (seed 1)."""
  graph, graph_loss, params, _ = helpers.problem_and_loss(dtype, seed=0)
  peer, peer_loss, _, _ = helpers.problem_and_loss(dtype, seed=1)
  return graph, graph_loss, peer, peer_loss, params


def official_fgsam_adam(graph, peer, steps, *, lr, rho, lam, weight_decay,
                        b1=0.9, b2=0.999, eps=1e-8):
  """The official FGSAM step (``GPN+FGSAM/train.py``, ``sam.py``) in NumPy:
  g_G at x, e = rho g_G/(||g_G|| + 1e-12), g_X at x + e, the combination
  lam g_X + (1 - lam) g_G, then ``torch.optim.Adam`` with its coupled
  ``weight_decay`` (bias-corrected, eps outside the square root)."""
  xs = [np.array(x, np.float64) for x in graph.x0]
  m = [np.zeros_like(x) for x in xs]
  v = [np.zeros_like(x) for x in xs]
  trajectory = []
  for t in range(1, steps + 1):
    g_graph = graph.grad(xs)
    scale = rho / (reference.norm(g_graph) + 1e-12)
    g_peer = peer.grad([x + scale * g for x, g in zip(xs, g_graph)])
    grads = [lam * gp + (1 - lam) * gg + weight_decay * x
             for gp, gg, x in zip(g_peer, g_graph, xs)]
    m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
    v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
    step_size = lr / (1 - b1 ** t)
    denom = [np.sqrt(vi) / np.sqrt(1 - b2 ** t) + eps for vi in v]
    xs = [x - step_size * mi / d for x, mi, d in zip(xs, m, denom)]
    trajectory.append(xs)
  return trajectory


def _run(opt, graph_loss, peer_loss, params, steps, *, plus=False):
  """FGSAM: the graph gradient, grad_fn the peer's. FGSAM+ (``plus``): the
  peer gradient, grad_fn the peer's and graph_grad_fn the graph's."""
  graph_grad, peer_grad = jax.grad(graph_loss), jax.grad(peer_loss)

  @jax.jit
  def step(params, state):
    if plus:
      updates, state = opt.update(peer_grad(params), state, params,
                                  grad_fn=peer_grad, graph_grad_fn=graph_grad)
    else:
      updates, state = opt.update(graph_grad(params), state, params,
                                  grad_fn=peer_grad)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(params)
  return trajectory, state


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_fgsam_matches_the_official_step(dtype, weight_decay):
  graph, graph_loss, peer, peer_loss, params = _two_losses(dtype)
  opt = samtx.fgsam(LR, RHO, lam=LAM, weight_decay=weight_decay)
  got, _ = _run(opt, graph_loss, peer_loss, params, STEPS)
  want = official_fgsam_adam(graph, peer, STEPS, lr=LR, rho=RHO, lam=LAM,
                             weight_decay=weight_decay)
  helpers.assert_close_to_reference(got, want, dtype)


def test_fgsam_perturbation_is_the_documented_combination(dtype):
  """One step of the transform alone: lam h + (1 - lam) g, with h the peer
  gradient at SAM's ascent point of g, and the perturbation norm rho."""
  graph, graph_loss, peer, peer_loss, params = _two_losses(dtype)
  tx = samtx.fgsam_perturbation(RHO, lam=LAM)
  out, state = tx.update(jax.grad(graph_loss)(params), tx.init(params),
                         params, grad_fn=jax.grad(peer_loss))
  g = graph.grad(graph.x0)
  e = reference.sam_perturbation(graph.x0, g, RHO)
  h = peer.grad([x + ei for x, ei in zip(graph.x0, e)])
  want = [LAM * hi + (1 - LAM) * gi for hi, gi in zip(h, g)]
  tol = helpers.tolerances(dtype)
  for got_leaf, want_leaf in zip(helpers.leaves(out), want):
    np.testing.assert_allclose(got_leaf, want_leaf, **tol)
  np.testing.assert_allclose(float(state.perturbation_norm), RHO, **tol)


def test_rho_zero_is_adam_on_the_graph_gradient_bit_for_bit():
  """At rho = 0 the peer term is off with the perturbation: the steps are
  optax.adam's on g exactly, although grad_fn is another loss."""
  _, graph_loss, _, peer_loss, params = _two_losses(jnp.float32)
  got, _ = _run(samtx.fgsam(LR, 0.0, lam=LAM), graph_loss, peer_loss,
                params, STEPS)
  want, _ = helpers.run(optax.adam(LR), graph_loss, params, STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)


def test_rho_schedule_reaching_zero_switches_the_peer_term_off():
  """With rho a schedule the rule follows rho_t: lam h + (1 - lam) g while
  rho_t > 0, g exactly from the step where rho_t = 0."""
  _, graph_loss, _, peer_loss, params = _two_losses(jnp.float32)
  graph_grad, peer_grad = jax.grad(graph_loss), jax.grad(peer_loss)
  rho = optax.piecewise_constant_schedule(RHO, {2: 0.0})
  tx = samtx.fgsam_perturbation(rho, lam=LAM)
  state = tx.init(params)
  g = graph_grad(params)
  for step in range(3):
    out, state = tx.update(g, state, params, grad_fn=peer_grad)
    differs = any(bool(jnp.any(a != b)) for a, b in zip(
        jax.tree.leaves(out), jax.tree.leaves(g)))
    assert differs == (step < 2)


def test_zero_gradient_gives_a_finite_update():
  """g = 0: no perturbation, and the output is lam times the peer gradient."""
  _, _, _, peer_loss, params = _two_losses(jnp.float32)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = samtx.fgsam_perturbation(RHO, lam=LAM)
  out, state = tx.update(zeros, tx.init(params), params,
                         grad_fn=jax.grad(peer_loss))
  want = jax.tree.map(lambda h: LAM * h, jax.grad(peer_loss)(params))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(state.perturbation_norm) == 0.0
  opt = samtx.fgsam(LR, RHO, lam=LAM)
  updates, _ = opt.update(zeros, opt.init(params), params,
                          grad_fn=lambda p: jax.tree.map(jnp.zeros_like, p))
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)


def test_lam_bounds_are_the_two_gradients():
  """lam = 0 passes g through (grad_fn still evaluated), lam = 1 is the peer
  gradient at the perturbed point alone."""
  graph, graph_loss, peer, peer_loss, params = _two_losses(jnp.float32)
  g = jax.grad(graph_loss)(params)
  calls = []

  def peer_grad(p):
    calls.append(None)
    return jax.grad(peer_loss)(p)

  out0, _ = samtx.fgsam_perturbation(RHO, lam=0.0).update(
      g, samtx.fgsam_perturbation(RHO).init(params), params,
      grad_fn=peer_grad)
  for a, b in zip(jax.tree.leaves(out0), jax.tree.leaves(g)):
    np.testing.assert_array_equal(a, b)
  assert len(calls) == 1
  out1, _ = samtx.fgsam_perturbation(RHO, lam=1.0).update(
      g, samtx.fgsam_perturbation(RHO).init(params), params,
      grad_fn=peer_grad)
  e = reference.sam_perturbation(graph.x0, graph.grad(graph.x0), RHO)
  want = peer.grad([x + ei for x, ei in zip(graph.x0, e)])
  for got_leaf, want_leaf in zip(helpers.leaves(out1), want):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=3e-5, atol=3e-6)


def test_injected_lam_changes_at_run_time():
  """inject_hyperparams: lam and rho set in the state take effect on the
  next step, matching a transform built with the new values (the transform
  alone: Adam's first step would hide lam behind its normalisation)."""
  _, graph_loss, _, peer_loss, params = _two_losses(jnp.float32)
  graph_grad, peer_grad = jax.grad(graph_loss), jax.grad(peer_loss)
  injected = optax.inject_hyperparams(samtx.fgsam_perturbation)(
      rho=RHO, lam=LAM)
  state = injected.init(params)
  state.hyperparams["lam"] = jnp.asarray(0.8)
  state.hyperparams["rho"] = jnp.asarray(0.02)
  got, _ = injected.update(graph_grad(params), state, params,
                           grad_fn=peer_grad)
  plain = samtx.fgsam_perturbation(0.02, lam=0.8)
  want, _ = plain.update(graph_grad(params), plain.init(params), params,
                         grad_fn=peer_grad)
  before = samtx.fgsam_perturbation(RHO, lam=LAM)
  old, _ = before.update(graph_grad(params), before.init(params), params,
                         grad_fn=peer_grad)
  for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                     jax.tree.leaves(old)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(a, c, rtol=1e-3)


@pytest.mark.parametrize("make,error,message", [
    (lambda: samtx.fgsam_perturbation(0.05, lam=-0.1), ValueError, "lam"),
    (lambda: samtx.fgsam_perturbation(0.05, lam=1.5), ValueError, "lam"),
    (lambda: samtx.fgsam_perturbation(0.05, lam="half"), TypeError, "lam"),
    (lambda: samtx.fgsam_perturbation(-0.05), ValueError, "rho"),
    (lambda: samtx.fgsam_perturbation(0.05, eps=0.0), ValueError, "eps"),
    (lambda: samtx.fgsam(0.01, lam=2.0), ValueError, "lam"),
    (lambda: samtx.fgsam(0.01, b1=1.0), ValueError, "b1"),
    (lambda: samtx.fgsam(0.01, eps=-1.0), ValueError, "eps"),
    (lambda: samtx.fgsam(0.01, weight_decay=-5e-4), ValueError,
     "weight_decay"),
    (lambda: samtx.fgsam(-0.01), ValueError, "learning_rate"),
])
def test_bad_arguments_are_one_line_errors(make, error, message):
  with pytest.raises(error, match=message) as info:
    make()
  assert "\n" not in str(info.value)


def test_missing_grad_fn_is_a_clear_error():
  _, graph_loss, _, _, params = _two_losses(jnp.float32)
  opt = samtx.fgsam(LR)
  with pytest.raises(TypeError, match="grad_fn"):
    opt.update(jax.grad(graph_loss)(params), opt.init(params), params)


# --------------------------------------------------------------------- FGSAM+
def fgsam_plus_adam(graph, peer, steps, *, lr, rho, lam, k, alpha,
                    weight_decay, eps_rule=1e-12, b1=0.9, b2=0.999,
                    eps=1e-8):
  """FGSAM+ (global norms, the samtx convention) then torch's Adam, from the
  equations: every k-th step g_G, e, h at x + e, g_s = lam h + (1-lam) g_G
  and g_v = g_s minus its projection on the MLP gradient m; in between
  m + alpha n(m)/(n(g_v) + eps) g_v."""
  xs = [np.array(x, np.float64) for x in graph.x0]
  m1 = [np.zeros_like(x) for x in xs]
  m2 = [np.zeros_like(x) for x in xs]
  g_v = [np.zeros_like(x) for x in xs]
  trajectory = []
  for t in range(steps):
    m = peer.grad(xs)
    if t % k == 0:
      g_graph = graph.grad(xs)
      scale = rho / (reference.norm(g_graph) + eps_rule)
      h = peer.grad([x + scale * g for x, g in zip(xs, g_graph)])
      out = [lam * hi + (1 - lam) * gi for hi, gi in zip(h, g_graph)]
      n_m, n_s = reference.norm(m), reference.norm(out)
      cos = reference.dot(m, out) / (n_m * n_s + eps_rule)
      g_v = [s - n_s * cos * mi / (n_m + eps_rule) for s, mi in zip(out, m)]
    else:
      coef = alpha * reference.norm(m) / (reference.norm(g_v) + eps_rule)
      out = [mi + coef * v for mi, v in zip(m, g_v)]
    grads = [o + weight_decay * x for o, x in zip(out, xs)]
    m1 = [b1 * a + (1 - b1) * g for a, g in zip(m1, grads)]
    m2 = [b2 * a + (1 - b2) * g * g for a, g in zip(m2, grads)]
    step = lr / (1 - b1 ** (t + 1))
    xs = [x - step * a / (np.sqrt(c) / np.sqrt(1 - b2 ** (t + 1)) + eps)
          for x, a, c in zip(xs, m1, m2)]
    trajectory.append(xs)
  return trajectory


@pytest.mark.parametrize("k,alpha,weight_decay", [(2, 0.7, 5e-4),
                                                  (3, 0.2, 0.0)])
def test_fgsam_plus_matches_reference(dtype, k, alpha, weight_decay):
  graph, graph_loss, peer, peer_loss, params = _two_losses(dtype)
  opt = samtx.fgsam_plus(LR, RHO, k=k, alpha=alpha, lam=LAM,
                         weight_decay=weight_decay)
  got, _ = _run(opt, graph_loss, peer_loss, params, STEPS, plus=True)
  want = fgsam_plus_adam(graph, peer, STEPS, lr=LR, rho=RHO, lam=LAM, k=k,
                         alpha=alpha, weight_decay=weight_decay)
  helpers.assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fgsam_plus_runs_the_graph_network_once_per_k_steps(k):
  """Under jit, graph_grad_fn and grad_fn run on FGSAM steps only (twice
  grad_fn's loss there: m is passed in, h is evaluated); the steps in
  between are one MLP gradient."""
  _, graph_loss, _, peer_loss, params = _two_losses(jnp.float32)
  graph_calls, peer_calls = [], []

  def counted(loss, calls):
    grad = jax.grad(loss)

    def fn(p):
      jax.debug.callback(lambda: calls.append(1))
      return grad(p)
    return fn

  opt = samtx.fgsam_plus(LR, RHO, k=k)
  peer_grad, graph_grad = (counted(peer_loss, peer_calls),
                           counted(graph_loss, graph_calls))

  @jax.jit
  def step(p, s):
    u, s = opt.update(jax.grad(peer_loss)(p), s, p, grad_fn=peer_grad,
                      graph_grad_fn=graph_grad)
    return optax.apply_updates(p, u), s

  p, s = params, opt.init(params)
  for n in range(1, 3 * k + 1):
    p, s = step(p, s)
    jax.effects_barrier()
    assert len(graph_calls) == len(peer_calls) == -(-n // k), n


def test_fgsam_plus_rho_zero_is_adam_on_the_mlp_gradient_bit_for_bit():
  _, graph_loss, _, peer_loss, params = _two_losses(jnp.float32)
  got, state = _run(samtx.fgsam_plus(LR, 0.0, k=2), graph_loss, peer_loss,
                     params, STEPS, plus=True)
  want, _ = helpers.run(optax.adam(LR), peer_loss, params, STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)
  g_v = state[0].inner.g_v
  assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(g_v))


def test_fgsam_plus_zero_gradients_are_finite():
  _, _, _, _, params = _two_losses(jnp.float32)
  zero_grad = lambda p: jax.tree.map(jnp.zeros_like, p)
  opt = samtx.fgsam_plus(LR, RHO, k=2)
  state = opt.init(params)
  for _ in range(3):
    updates, state = opt.update(zero_grad(params), state, params,
                                grad_fn=zero_grad, graph_grad_fn=zero_grad)
    for u in jax.tree.leaves(updates):
      np.testing.assert_array_equal(u, 0.0)


def test_fgsam_plus_needs_graph_grad_fn_with_a_clear_error():
  _, _, _, peer_loss, params = _two_losses(jnp.float32)
  opt = samtx.fgsam_plus(LR)
  with pytest.raises(TypeError, match="graph_grad_fn"):
    opt.update(jax.grad(peer_loss)(params), opt.init(params), params,
               grad_fn=jax.grad(peer_loss))
  with pytest.raises(TypeError, match="structure of params"):
    opt.update(jax.grad(peer_loss)(params), opt.init(params), params,
               grad_fn=jax.grad(peer_loss), graph_grad_fn=lambda p: [1.0])
  # Right structure, a leaf of the wrong shape (a transposed gradient).
  transposed = lambda p: jax.tree.map(jnp.transpose, jax.grad(peer_loss)(p))
  assert any(np.ndim(x) == 2 and x.shape[0] != x.shape[1]
             for x in jax.tree.leaves(params))
  with pytest.raises(ValueError, match="graph_grad_fn returned shape"):
    opt.update(jax.grad(peer_loss)(params), opt.init(params), params,
               grad_fn=jax.grad(peer_loss), graph_grad_fn=transposed)


@pytest.mark.parametrize("make,error,message", [
    (lambda: samtx.fgsam_plus_perturbation(0.1, k=0), ValueError, "k"),
    (lambda: samtx.fgsam_plus_perturbation(0.1, k=1.5), TypeError, "k"),
    (lambda: samtx.fgsam_plus_perturbation(0.1, alpha=-1.0), ValueError,
     "alpha"),
    (lambda: samtx.fgsam_plus_perturbation(0.1, lam=1.2), ValueError, "lam"),
    (lambda: samtx.fgsam_plus(0.01, weight_decay=-1.0), ValueError,
     "weight_decay"),
])
def test_fgsam_plus_bad_arguments_are_one_line_errors(make, error, message):
  with pytest.raises(error, match=message) as info:
    make()
  assert "\n" not in str(info.value)
