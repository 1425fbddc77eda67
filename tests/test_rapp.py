"""RAPP (anchored Lookahead) on min-max games, against NumPy recurrences.

The games: a bilinear one, ``min_x max_y x^T A y`` with
``F = (A y, -A^T x)``, and a cohypomonotone (nonconvex-nonconcave) one,
``f = a <x, y> + (b/2)(|x|^2 - |y|^2)`` with ``b < 0``: its operator
``F = (b x + a y, -a x + b y)`` is rho-comonotone with
``rho = b/(a^2 + b^2) < 0`` and ``rho > -1/(2L)``, ``L = sqrt(a^2 + b^2)``,
the range of the paper's theorem. Gradient descent-ascent diverges on both
for every step size; RAPP and Lookahead-GDA converge with the settings
below. Each run is checked against two NumPy transcriptions: the official
PyTorch code's loop (``rapp/optim/RAPP.py``, ``lookahead.py``, the anchor
reset in ``model.py``) and the paper's recurrence.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx

GAMMA, TAU, LAM = 0.8, 3, 0.3
A_COEF, B_COEF = 1.0, -0.2          # the cohypomonotone game


def bilinear_matrix():
  """A 3 x 3 coupling with singular values 1, 0.8, 0.6 (L = 1)."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  r, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  return q @ np.diag([1.0, 0.8, 0.6]) @ r


def bilinear_field(z):
  a = bilinear_matrix()
  return {"x": a @ z["y"], "y": -a.T @ z["x"]}


def cohypomonotone_field(z):
  return {"x": B_COEF * z["x"] + A_COEF * z["y"],
          "y": -A_COEF * z["x"] + B_COEF * z["y"]}


GAMES = {"bilinear": bilinear_field, "cohypomonotone": cohypomonotone_field}


def start():
  return {"x": np.array([1.0, -0.5, 0.25]), "y": np.array([0.5, 1.0, -1.0])}


def _jnp_field(field):
  """The NumPy field on jnp leaves (the matrices are constants)."""
  a = jnp.asarray(bilinear_matrix())
  if field is bilinear_field:
    return lambda z: {"x": a @ z["y"], "y": -a.T @ z["x"]}
  return lambda z: {"x": B_COEF * z["x"] + A_COEF * z["y"],
                    "y": -A_COEF * z["x"] + B_COEF * z["y"]}


# ------------------------------------------------------ NumPy transcriptions
def _tree(fn, *trees):
  return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def official_loop(field, steps, *, lr, inner_steps, lam, anchored):
  """The official code with SGD inner steps, step by step: before step s
  (counted from 1) with ``s % inner_steps == 0`` the anchor moves to
  ``(1 - lam) anchor + lam p`` and ``p`` restarts there; then
  ``p = anchor - lr F(p)`` (RAPP) or ``p = p - lr F(p)`` (Lookahead).
  Returns the points where the field is evaluated, and the anchors."""
  p, anchor = start(), None
  points, anchors = [], []
  for s in range(1, steps + 1):
    if s % inner_steps == 0:
      anchor = anchor if anchor is not None else _tree(np.copy, p)
      anchor = _tree(lambda a, q: (1 - lam) * a + lam * q, anchor, p)
      p = _tree(np.copy, anchor)
    anchor = anchor if anchor is not None else _tree(np.copy, p)
    points.append(p)
    anchors.append(anchor)
    u = _tree(lambda f: -lr * f, field(p))
    base = anchor if anchored else p
    p = _tree(np.add, base, u)
  return points, anchors


def paper_recurrence(field, cycles, *, gamma, tau, lam, anchored):
  """RAPP (Algorithm: w_0 = z, w_{t+1} = z - gamma F(w_t), then
  z = (1 - lam) z + lam w_tau) or Lookahead-GDA (w_{t+1} = w_t - gamma
  F(w_t)); returns the points where F is evaluated and the anchors."""
  z = start()
  points, anchors = [], []
  for _ in range(cycles):
    w = z
    for _ in range(tau):
      points.append(w)
      anchors.append(z)
      base = z if anchored else w
      w = _tree(lambda b, f: b - gamma * f, base, field(w))
    z = _tree(lambda a, b: (1 - lam) * a + lam * b, z, w)
  return points, anchors, z


# ---------------------------------------------------------------- samtx runs
def run(tx, field, steps, *, steps_since_sync=0):
  """Points where the field is evaluated and the slow weights, step by step."""
  field = _jnp_field(field)
  params = optax.LookaheadParams.init_synced(
      jax.tree.map(jnp.asarray, start()))
  state = tx.init(params)
  state = state._replace(steps_since_sync=jnp.asarray(steps_since_sync,
                                                      jnp.int32))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(field(params.fast), state, params)
    return optax.apply_updates(params, updates), state

  points, anchors = [], []
  for _ in range(steps):
    points.append(params.fast)
    anchors.append(params.slow)
    params, state = step(params, state)
  return points, anchors, params


def assert_same_sequence(got, want, **tolerance):
  assert len(got) == len(want)
  for t, (g, w) in enumerate(zip(got, want)):
    for key in w:
      np.testing.assert_allclose(np.asarray(g[key]), w[key],
                                 err_msg=f"step {t}, {key}", **tolerance)


def _norm(z):
  return float(np.sqrt(sum(np.sum(np.asarray(v) ** 2) for v in z.values())))


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("anchored", [True, False], ids=["rapp", "lookahead"])
@pytest.mark.parametrize("tau,lam", [(1, 0.3), (2, 0.7), (3, 0.3), (5, 0.5)])
@pytest.mark.parametrize("game", GAMES)
def test_matches_the_official_loop(game, tau, lam, anchored):
  """Bit-level agreement (float64) with the official code, whose first
  cycle is one step shorter: the samtx state starts at steps_since_sync =
  1 % tau to line the syncs up."""
  field = GAMES[game]
  make = samtx.rapp if anchored else samtx.lookahead
  steps = 4 * tau + 3
  with jax.enable_x64(True):
    points, anchors, _ = run(make(optax.sgd(GAMMA), tau, lam), field, steps,
                             steps_since_sync=1 % tau)
    want_points, want_anchors = official_loop(
        field, steps, lr=GAMMA, inner_steps=tau, lam=lam, anchored=anchored)
    assert_same_sequence(points, want_points, rtol=1e-13, atol=1e-14)
    assert_same_sequence(anchors[1:], want_anchors[1:], rtol=1e-13,
                         atol=1e-14)


@pytest.mark.parametrize("anchored", [True, False], ids=["rapp", "lookahead"])
@pytest.mark.parametrize("tau,lam", [(1, 0.3), (2, 0.7), (3, 0.3), (5, 0.5)])
@pytest.mark.parametrize("game", GAMES)
def test_matches_the_paper_recurrence(game, tau, lam, anchored):
  """From a fresh state every cycle has tau inner steps, as in the paper
  (and optax.lookahead)."""
  field = GAMES[game]
  make = samtx.rapp if anchored else samtx.lookahead
  cycles = 4
  with jax.enable_x64(True):
    points, anchors, final = run(make(optax.sgd(GAMMA), tau, lam), field,
                                 cycles * tau)
    want_points, want_anchors, want_z = paper_recurrence(
        field, cycles, gamma=GAMMA, tau=tau, lam=lam, anchored=anchored)
    assert_same_sequence(points, want_points, rtol=1e-13, atol=1e-14)
    assert_same_sequence(anchors, want_anchors, rtol=1e-13, atol=1e-14)
    assert_same_sequence([final.slow], [want_z], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("game", GAMES)
def test_gda_diverges_where_rapp_and_lookahead_converge(game):
  field = GAMES[game]
  z0 = _norm(start())
  # Gradient descent-ascent: |1 - gamma mu| > 1 for every eigenvalue mu of
  # F's matrix (imaginary for the bilinear game, real part b < 0 for the
  # other).
  gda = start()
  for _ in range(100):
    gda = _tree(lambda z, f: z - GAMMA * f, gda, field(gda))
  assert _norm(gda) > 1e4 * z0
  with jax.enable_x64(True):
    for make in (samtx.rapp, samtx.lookahead):
      _, _, final = run(make(optax.sgd(GAMMA), TAU, LAM), field, 900)
      assert _norm(final.slow) < 1e-4 * z0, make.__name__
      _, _, want = paper_recurrence(field, 300, gamma=GAMMA, tau=TAU, lam=LAM,
                                    anchored=make is samtx.rapp)
      assert_same_sequence([final.slow], [want], rtol=1e-9, atol=1e-14)


def test_rapp_converges_where_lookahead_gda_diverges():
  """On the cohypomonotone game with lam = 0.5 the Lookahead-GDA cycle map
  has spectral radius 1.11 per step and RAPP's 0.88: the anchored inner
  loop (an approximate resolvent) widens the range that converges."""
  z0 = _norm(start())
  with jax.enable_x64(True):
    _, _, anchored = run(samtx.rapp(optax.sgd(GAMMA), TAU, 0.5),
                         cohypomonotone_field, 300)
    _, _, plain = run(samtx.lookahead(optax.sgd(GAMMA), TAU, 0.5),
                      cohypomonotone_field, 300)
  assert _norm(anchored.slow) < 1e-6 * z0
  assert _norm(plain.slow) > 1e6 * z0


def test_sync_period_one_is_lookahead_and_lam_one_is_gda():
  """tau = 1: every inner step starts from the anchor anyway, so RAPP is
  Lookahead; with lam = 1 as well both are gradient descent-ascent."""
  with jax.enable_x64(True):
    for lam in (0.3, 1.0):
      _, rapp_anchors, _ = run(samtx.rapp(optax.sgd(GAMMA), 1, lam),
                               cohypomonotone_field, 10)
      _, la_anchors, _ = run(samtx.lookahead(optax.sgd(GAMMA), 1, lam),
                             cohypomonotone_field, 10)
      assert_same_sequence(rapp_anchors,
                           [jax.tree.map(np.asarray, a) for a in la_anchors],
                           rtol=1e-14, atol=1e-15)
    gda, want = start(), []
    for _ in range(10):
      want.append(gda)
      gda = _tree(lambda z, f: z - GAMMA * f, gda, cohypomonotone_field(gda))
    assert_same_sequence(rapp_anchors, want, rtol=1e-14, atol=1e-15)


def numpy_adam_inner(field, steps, *, lr, tau, lam, anchored, reset_state,
                     b1=0.9, b2=0.999, eps=1e-8):
  """A stateful inner optimizer: Adam's update u_t of F(w_t) is applied from
  the anchor (RAPP) or from w_t (Lookahead, the official ``AdamLA``, whose
  moments carry across syncs); ``reset_state`` restarts them after each
  sync. Returns the anchors after every step."""
  z = start()
  w = z
  m = _tree(np.zeros_like, z)
  v = _tree(np.zeros_like, z)
  count, out = 0, []
  for t in range(steps):
    f = field(w)
    count += 1
    m = _tree(lambda a, g: b1 * a + (1 - b1) * g, m, f)
    v = _tree(lambda a, g: b2 * a + (1 - b2) * g * g, v, f)
    u = _tree(lambda a, c: -lr * (a / (1 - b1 ** count))
              / (np.sqrt(c / (1 - b2 ** count)) + eps), m, v)
    w = _tree(np.add, z if anchored else w, u)
    if (t + 1) % tau == 0:
      z = _tree(lambda a, b: (1 - lam) * a + lam * b, z, w)
      w = z
      if reset_state:
        m, v, count = _tree(np.zeros_like, z), _tree(np.zeros_like, z), 0
    out.append(z)
  return out


@pytest.mark.parametrize("reset_state", [False, True])
@pytest.mark.parametrize("anchored", [True, False], ids=["rapp", "lookahead"])
def test_adam_inner_steps_keep_or_reset_their_moments(anchored, reset_state):
  make = samtx.rapp if anchored else samtx.lookahead
  steps = 11
  with jax.enable_x64(True):
    tx = make(optax.adam(0.05), TAU, LAM, reset_state)
    _, anchors, final = run(tx, bilinear_field, steps)
    want = numpy_adam_inner(bilinear_field, steps, lr=0.05, tau=TAU, lam=LAM,
                            anchored=anchored, reset_state=reset_state)
    assert_same_sequence(anchors[1:] + [final.slow], want, rtol=1e-12,
                         atol=1e-14)


def test_injected_fast_learning_rate_changes_at_run_time():
  """The fast optimizer's step size under inject_hyperparams: halving it
  mid-run gives the recurrence with gamma halved from that step on."""
  steps, change_at = 12, 5
  with jax.enable_x64(True):
    fast = optax.inject_hyperparams(optax.sgd)(learning_rate=GAMMA)
    tx = samtx.rapp(fast, TAU, LAM)
    field = _jnp_field(cohypomonotone_field)
    params = optax.LookaheadParams.init_synced(
        jax.tree.map(jnp.asarray, start()))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
      if t == change_at:
        state.fast_state.hyperparams["learning_rate"] = jnp.asarray(GAMMA / 2)
      updates, state = update(field(params.fast), state, params)
      params = optax.apply_updates(params, updates)
    z, w = start(), start()
    for t in range(steps):
      gamma = GAMMA if t < change_at else GAMMA / 2
      w = _tree(lambda a, f: a - gamma * f, z, cohypomonotone_field(w))
      if (t + 1) % TAU == 0:
        z = _tree(lambda a, b: (1 - LAM) * a + LAM * b, z, w)
        w = z
    assert_same_sequence([params.slow, params.fast], [z, w], rtol=1e-13,
                         atol=1e-14)


def test_grad_fn_is_forwarded_and_evaluated_around_the_fast_weights():
  """A two-pass inner optimizer inside RAPP: grad_fn reaches it, is called
  at the fast weights plus SAM's perturbation, and its step is applied from
  the anchor."""
  loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p ** 4)
  grad = jax.grad(loss)
  seen = []
  tx = samtx.rapp(samtx.sam(0.05, 0.1), TAU, LAM)
  pair = optax.LookaheadParams(fast=jnp.array([0.3, -0.2]),
                               slow=jnp.array([2.0, 1.5]))
  updates, _ = tx.update(grad(pair.fast), tx.init(pair), pair,
                         grad_fn=lambda p: seen.append(p) or grad(p))
  g = grad(pair.fast)
  e = 0.1 * g / jnp.linalg.norm(g)
  np.testing.assert_allclose(seen[0], pair.fast + e, rtol=1e-6)
  new_fast = optax.apply_updates(pair, updates).fast
  np.testing.assert_allclose(new_fast, pair.slow - 0.05 * grad(pair.fast + e),
                             rtol=1e-6)


def test_rapp_msam_applies_the_clean_step_from_the_anchor():
  """A one-pass inner optimizer (MSAM holds x~ = x - c v): the clean inner
  iterate is anchor + (MSAM's clean step), and the held fast weights sit
  below it by the new perturbation."""
  loss = lambda p: jnp.sum((p - 1.0) ** 2)
  grad = jax.grad(loss)
  lr, rho, mu = 0.1, 0.05, 0.9
  tx = samtx.rapp(samtx.msam(lr, rho, momentum=mu), 5, LAM)
  params = optax.LookaheadParams.init_synced(jnp.array([0.0, 2.0]))
  state = tx.init(params)
  x, v = np.array([0.0, 2.0]), np.zeros(2)
  anchor = x.copy()
  for _ in range(3):                      # inner steps, no sync
    held = x - rho * v / (np.linalg.norm(v) + 1e-12)
    np.testing.assert_allclose(params.fast, held, rtol=1e-6, atol=1e-7)
    updates, state = tx.update(grad(params.fast), state, params)
    params = optax.apply_updates(params, updates)
    v = mu * v + 2 * (held - 1.0)
    x = anchor - lr * v
  np.testing.assert_allclose(samtx.unperturb(params.fast, state.fast_state),
                             x, rtol=1e-6)
  np.testing.assert_allclose(params.slow, anchor)


@pytest.mark.parametrize("make,error,message", [
    (lambda: samtx.rapp(optax.sgd(0.1), 0, 0.5), ValueError, "sync_period"),
    (lambda: samtx.rapp(optax.sgd(0.1), 2.5, 0.5), TypeError, "sync_period"),
    (lambda: samtx.rapp(optax.sgd(0.1), 3, 1.5), ValueError,
     "slow_step_size"),
    (lambda: samtx.rapp(optax.sgd(0.1), 3, 0.5, "no"), TypeError,
     "reset_state"),
    (lambda: samtx.rapp(optax.sgd, 3, 0.5), TypeError, "fast_optimizer"),
])
def test_bad_arguments_are_one_line_errors(make, error, message):
  with pytest.raises(error, match=f"rapp: {message}") as info:
    make()
  assert "\n" not in str(info.value)
