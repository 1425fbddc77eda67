"""Independent NumPy implementations of the DESIGN.md equations.

Everything here works on flat lists of NumPy arrays, in float64, written
straight from the equations (no samtx, optax or JAX code), so the tests compare
two implementations that share nothing.
"""

import numpy as np


def norm(xs):
  return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in xs))


class Problem:
  """f(x) = sum a x^4/4 + c x^2/2 + d x over a list of leaves; grad by hand."""

  def __init__(self, shapes, seed=0):
    rng = np.random.default_rng(seed)
    self.a = [rng.uniform(0.1, 1.0, s) for s in shapes]
    self.c = [rng.uniform(0.5, 2.0, s) for s in shapes]
    self.d = [rng.normal(size=s) for s in shapes]
    self.x0 = [rng.normal(size=s) for s in shapes]

  def grad(self, xs):
    return [a * x ** 3 + c * x + d
            for a, c, d, x in zip(self.a, self.c, self.d, xs)]


# ---------------------------------------------------------------- ascent rules
def sam_perturbation(xs, gs, rho, *, adaptive=False, eta=0.0, eps=1e-12):
  if adaptive:
    ts = [np.abs(x) + eta for x in xs]
    denom = norm([t * g for t, g in zip(ts, gs)]) + eps
    return [rho * t * t * g / denom for t, g in zip(ts, gs)]
  denom = norm(gs) + eps
  return [rho * g / denom for g in gs]


class AdaGradNorm:
  def __init__(self, xs, eps):
    self.u = eps ** 2

  def __call__(self, gs):
    self.u += norm(gs) ** 2
    return [g / np.sqrt(self.u) for g in gs]


class AdaGrad:
  def __init__(self, xs, eps):
    self.u = [np.full(np.shape(x), eps ** 2) for x in xs]

  def __call__(self, gs):
    self.u = [u + g * g for u, g in zip(self.u, gs)]
    return [g / np.sqrt(u) for g, u in zip(gs, self.u)]


class AdamForm:
  def __init__(self, xs, eps, b1=0.9, b2=0.999):
    self.b1, self.b2 = b1, b2
    self.m = [np.zeros(np.shape(x)) for x in xs]
    self.v = [np.full(np.shape(x), eps ** 2) for x in xs]

  def __call__(self, gs):
    self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m, gs)]
    self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, gs)]
    return [m / np.sqrt(v) for m, v in zip(self.m, self.v)]


class AMSGrad:
  def __init__(self, xs, eps, b1=0.9, b2=0.999, delayed=False):
    self.b1, self.b2, self.delayed, self.eps = b1, b2, delayed, eps
    self.m = [np.zeros(np.shape(x)) for x in xs]
    self.v = [np.zeros(np.shape(x)) for x in xs]
    self.vhat = [np.full(np.shape(x), eps ** 2) for x in xs]

  def __call__(self, hs):
    self.m = [self.b1 * m + (1 - self.b1) * h for m, h in zip(self.m, hs)]
    self.v = [self.b2 * v + (1 - self.b2) * h * h for v, h in zip(self.v, hs)]
    prev = self.vhat
    self.vhat = [np.maximum(p, v) for p, v in zip(prev, self.v)]
    if self.delayed:
      # Previous vhat where a coordinate has history that is at least a
      # quarter of this step's vhat, else this step's.
      denom = [np.where((p > self.eps ** 2) & (4 * p >= vh), p, vh)
               for p, vh in zip(prev, self.vhat)]
    else:
      denom = self.vhat
    return [m / np.sqrt(d) for m, d in zip(self.m, denom)]


class SGD:
  def __init__(self, xs, momentum=0.0, nesterov=False):
    self.mu, self.nesterov = momentum, nesterov
    self.v = [np.zeros(np.shape(x)) for x in xs]

  def __call__(self, hs):
    self.v = [self.mu * v + h for v, h in zip(self.v, hs)]
    if self.nesterov:
      return [h + self.mu * v for h, v in zip(hs, self.v)]
    return list(self.v)


PRECONDITIONERS = {"adagrad_norm": AdaGradNorm, "adagrad": AdaGrad,
                   "adam": AdamForm}


# ------------------------------------------------------------------ optimizers
def run_two_pass(problem, steps, lr, ascent, descent):
  """x <- x - lr * descent(grad(x + ascent(x, grad(x)))), recorded per step."""
  xs = [np.array(x, np.float64) for x in problem.x0]
  trajectory = []
  for _ in range(steps):
    gs = problem.grad(xs)
    es = ascent(xs, gs)
    hs = problem.grad([x + e for x, e in zip(xs, es)])
    ds = descent(hs)
    xs = [x - lr * d for x, d in zip(xs, ds)]
    trajectory.append(xs)
  return trajectory


def sam_run(problem, steps, lr, rho, *, momentum=0.0, nesterov=False,
            adaptive=False, eta=0.0):
  sgd = SGD(problem.x0, momentum, nesterov)
  return run_two_pass(
      problem, steps, lr,
      lambda xs, gs: sam_perturbation(xs, gs, rho, adaptive=adaptive, eta=eta),
      sgd)


def adasam_run(problem, steps, lr, rho, *, b1=0.9, b2=0.999, eps=1e-8,
               delayed=False):
  rule = AMSGrad(problem.x0, eps, b1, b2, delayed)
  return run_two_pass(problem, steps, lr,
                      lambda xs, gs: sam_perturbation(xs, gs, rho), rule)


def lightsam_run(problem, steps, lr, rho, variant, *, eps=1e-8, b1=0.9,
                 b2=0.999):
  kwargs = {"b1": b1, "b2": b2} if variant == "adam" else {}
  ascent_rule = PRECONDITIONERS[variant](problem.x0, eps, **kwargs)
  descent_rule = PRECONDITIONERS[variant](problem.x0, eps, **kwargs)
  return run_two_pass(
      problem, steps, lr,
      lambda xs, gs: [rho * d for d in ascent_rule(gs)], descent_rule)


def msam_adamw_run(problem, steps, lr, rho, *, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=1e-2):
  """The official AdamW_MSAM recurrence; returns (held x~, clean x) per step.

  ``lr`` may be a function of the step index counted from 0 (a scheduler
  that sets the group's lr before each step): the Adam step and the decay
  of one step both use that step's value.
  """
  lr_of = lr if callable(lr) else (lambda _: lr)
  x = [np.array(v, np.float64) for v in problem.x0]
  m = [np.zeros_like(xi) for xi in x]
  v = [np.zeros_like(xi) for xi in x]
  c = 0.0
  held = [xi.copy() for xi in x]
  out = []
  for t in range(1, steps + 1):
    lr = lr_of(t - 1)
    g = problem.grad(held)
    x = [h + c * mi for h, mi in zip(held, m)]
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    step_size = lr / (1 - b1 ** t)
    denom_scale = np.sqrt(1 - b2 ** t)
    x = [xi - step_size * mi / (np.sqrt(vi) / denom_scale + eps)
         for xi, mi, vi in zip(x, m, v)]
    x = [xi * (1 - lr * weight_decay) for xi in x]
    c = rho / (norm(m) + 1e-12)
    held = [xi - c * mi for xi, mi in zip(x, m)]
    out.append((held, x))
  return out


def msam_run(problem, steps, lr, rho, *, momentum=0.9, nesterov=False):
  """Returns (held weights x~, clean weights x) after each step."""
  x = [np.array(v, np.float64) for v in problem.x0]
  v = [np.zeros_like(xi) for xi in x]
  held = [xi.copy() for xi in x]
  out = []
  for _ in range(steps):
    g = problem.grad(held)
    n = norm(v) + 1e-12
    x = [h + rho * vi / n for h, vi in zip(held, v)]
    v = [momentum * vi + gi for vi, gi in zip(v, g)]
    d = [gi + momentum * vi for gi, vi in zip(g, v)] if nesterov else v
    x = [xi - lr * di for xi, di in zip(x, d)]
    n = norm(v) + 1e-12
    held = [xi - rho * vi / n for xi, vi in zip(x, v)]
    out.append((held, x))
  return out


# ------------------------------------------------------ the two-pass family
def dot(xs, ys):
  return sum(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64))
             for x, y in zip(xs, ys))


def run_rule(problem, steps, lr, rule, descent):
  """x <- x - lr * descent(rule(x, grad(x), grad)), recorded per step.

  ``rule`` may call ``grad`` (the second pass) or not (LookSAM's reuse).
  """
  xs = [np.array(x, np.float64) for x in problem.x0]
  trajectory = []
  for _ in range(steps):
    gs = problem.grad(xs)
    xs = [x - lr * d for x, d in zip(xs, descent(rule(xs, gs, problem.grad)))]
    trajectory.append(xs)
  return trajectory


def gradient_at_sam_point(xs, gs, grad, rho, adaptive=False, eps=1e-12):
  es = sam_perturbation(xs, gs, rho, adaptive=adaptive, eps=eps)
  return grad([x + e for x, e in zip(xs, es)])


def gsam_rule(rho, alpha, *, adaptive=False, eps=1e-12):
  """GSAM: h - alpha (g - cos n(g) h / (n(h) + eps))."""
  def rule(xs, gs, grad):
    hs = gradient_at_sam_point(xs, gs, grad, rho, adaptive, eps)
    ng, nh = norm(gs), norm(hs)
    cos = dot(gs, hs) / (ng * nh + eps)
    g_perp = [g - cos * ng * h / (nh + eps) for g, h in zip(gs, hs)]
    return [h - alpha * p for h, p in zip(hs, g_perp)]
  return rule


def wsam_rule(rho, gamma, *, adaptive=False, eps=1e-12):
  """WSAM, coupled form: (1 - a) g + a h with a = gamma / (1 - gamma)."""
  a = gamma / (1 - gamma)

  def rule(xs, gs, grad):
    hs = gradient_at_sam_point(xs, gs, grad, rho, adaptive, eps)
    return [(1 - a) * g + a * h for g, h in zip(gs, hs)]
  return rule


class FriendlySAMRule:
  """Friendly-SAM: ascend along g - sigma m (g on the first step)."""

  def __init__(self, rho, sigma, lmbda, *, adaptive=False, eps=1e-12):
    self.rho, self.sigma, self.lmbda = rho, sigma, lmbda
    self.adaptive, self.eps = adaptive, eps
    self.m = None

  def __call__(self, xs, gs, grad):
    if self.m is None:
      ds = [np.array(g) for g in gs]
      self.m = [np.array(g) for g in gs]
    else:
      ds = [g - self.sigma * m for g, m in zip(gs, self.m)]
      self.m = [self.lmbda * m + (1 - self.lmbda) * g
                for m, g in zip(self.m, gs)]
    es = sam_perturbation(xs, ds, self.rho, adaptive=self.adaptive,
                          eps=self.eps)
    return grad([x + e for x, e in zip(xs, es)])


class LookSAMRule:
  """LookSAM: SAM's gradient every k-th step, a stored g_v in between."""

  def __init__(self, rho, k, alpha, *, eps=1e-12):
    self.rho, self.k, self.alpha, self.eps = rho, k, alpha, eps
    self.t, self.g_v, self.second_passes = 0, None, 0

  def __call__(self, xs, gs, grad):
    t, self.t = self.t, self.t + 1
    ng = norm(gs)
    if t % self.k == 0:
      self.second_passes += 1
      hs = gradient_at_sam_point(xs, gs, grad, self.rho, eps=self.eps)
      nh = norm(hs)
      cos = dot(gs, hs) / (ng * nh + self.eps)
      self.g_v = [h - nh * cos * g / (ng + self.eps) for g, h in zip(gs, hs)]
      return hs
    scale = self.alpha * ng / (norm(self.g_v) + self.eps)
    return [g + scale * v for g, v in zip(gs, self.g_v)]
