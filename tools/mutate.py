"""Hand-made mutation testing for samtx's update rules.

Each mutant below is a one-line (or one-expression) bug in one of samtx's
rules: a sign, a missing conjugation, a schedule read one step late, a
hyper-parameter replaced by its complement. The script copies the
repository to a temporary directory once, and for each mutant writes the
mutated file into the copy (the working tree is never touched), runs only
the test files that should notice (``pytest -x``, stopping at the first
failure, under a timeout), restores the file, and reports:

- ``killed``: a test failed (or the mutated package no longer imports);
- ``survived``: every selected test passed, so the tests cannot see the bug;
- ``timeout``: the tests ran past ``--timeout`` (reported apart; not a kill).

Usage::

  python tools/mutate.py --list               # the mutants, one a line
  python tools/mutate.py --quick              # one mutant per module
  python tools/mutate.py --only gsam_sign --only wsam_weight
  python tools/mutate.py --report tools/mutation_report.md   # all of them

``tests/test_mutation_list.py`` (in the normal suite) checks that every
mutant's original text still occurs exactly once in the current source, so
an edit that moves a rule's text makes that test fail instead of silently
turning the mutant into a no-op.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the copy leaves out: version control, build outputs, caches.
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "_build",
                                 "*.egg-info", ".pytest_cache", ".mypy_cache",
                                 ".ruff_cache")


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One hand-made bug.

  Attributes:
    name: a short identifier (``--only`` takes it).
    path: the file, relative to the repository root.
    original: text that must occur exactly once in ``path``.
    mutated: what replaces it.
    tests: pytest arguments (files or node ids), most targeted first.
    why: the bug in words.
    quick: part of the ``--quick`` subset.
  """
  name: str
  path: str
  original: str
  mutated: str
  tests: tuple
  why: str
  quick: bool = False


C, MO, MS = "samtx/_common.py", "samtx/moments.py", "samtx/msam.py"
P, W, G = "samtx/perturbations.py", "samtx/wrappers.py", "samtx/guards.py"
PAR, AL, SH = "samtx/parallel.py", "samtx/aliases.py", "samtx/sharpness.py"
FL = "samtx/flax.py"
R3 = "tests/test_fidelity_round3.py"

MUTANTS = (
    # ------------------------------------------------------------ _common
    Mutant("vdot_without_conj", C,
           "jnp.real(jnp.conj(x.astype(", "jnp.real((x.astype(",
           ("tests/test_family.py::test_complex_cosine_is_the_real_inner_product",
            "tests/test_family.py"),
           "complex inner product sum(a b) instead of sum(conj(a) b)",
           quick=True),
    Mutant("abs_sq_without_conj", C,
           "    return jnp.real(x * jnp.conj(x))",
           "    return jnp.real(x * x)",
           ("tests/test_fidelity.py", "tests/test_common_suite.py"),
           "|z|^2 taken as Re(z^2) for complex leaves"),
    Mutant("stats_in_param_dtype", C,
           "  return jnp.promote_types(dtype, jnp.float32)",
           "  return jnp.dtype(dtype)",
           ("tests/test_fidelity.py", "tests/test_reliability.py"),
           "statistics of float16 leaves kept in float16"),
    Mutant("ema_weight", C,
           "(decay * o + (1 - decay) * n.astype(o.dtype))",
           "(decay * o + decay * n.astype(o.dtype))",
           ("tests/test_moments.py",),
           "moving average weighs the new value by decay, not 1 - decay"),
    Mutant("rho_not_clamped", C,
           "  return jnp.maximum(value, jnp.zeros_like(value))",
           "  return value",
           (R3,), "a negative run-time rho reverses the ascent"),
    Mutant("tree_sum_without_psum", C,
           "total = total + (jax.lax.psum(partial, axes) if axes else partial)",
           "total = total + partial",
           ("tests/test_family.py", "tests/test_sharded.py"),
           "global norms of model-sharded params summed over one block only"),
    Mutant("initial_moment_eps", C,
           "  return jnp.square(jnp.asarray(eps, dtype))",
           "  return jnp.asarray(eps, dtype)",
           ("tests/test_moments.py", "tests/test_fidelity.py"),
           "accumulators start at eps instead of eps**2"),
    Mutant("float_check_skipped", C,
           "    if not jnp.issubdtype(leaf.dtype, jnp.inexact):",
           "    if False:",
           ("tests/test_common_suite.py::test_integer_leaf_is_rejected_with_its_path",
            "tests/test_common_suite.py"),
           "integer leaves accepted silently"),
    # ------------------------------------------------------------ moments
    Mutant("amsgrad_without_max", MO,
           "nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)",
           "nu_max = nu",
           ("tests/test_moments.py",),
           "AMSGrad without the running maximum (plain Adam form)",
           quick=True),
    Mutant("delayed_without_floor", MO,
           "not_dwarfed = prev >= DELAYED_FLOOR * new",
           "not_dwarfed = prev >= 0 * new",
           (R3 + "::test_delayed_rule_against_numpy_on_a_gradient_spike",
            R3 + "::test_delayed_adasam_passes_optax_rosenbrock_check"),
           "the delayed form divides by a dwarfed history (diverges)"),
    Mutant("delayed_without_history_test", MO,
           "return jnp.where(has_history & not_dwarfed, prev, new)",
           "return jnp.where(not_dwarfed, prev, new)",
           (R3 + "::test_delayed_first_move_just_above_eps_uses_this_steps_vhat",
            "tests/test_fidelity.py"),
           "the delayed form divides by eps**2 on a coordinate with no history"),
    Mutant("adagrad_norm_without_sqrt", MO,
           "    root = jnp.sqrt(total)",
           "    root = total",
           ("tests/test_moments.py",),
           "AdaGrad-Norm divides by the sum of squares, not its root"),
    Mutant("adagrad_does_not_accumulate", MO,
           "lambda v, h: v + _common.sq_stat(h), state.sum_of_squares, updates)",
           "lambda v, h: _common.sq_stat(h), state.sum_of_squares, updates)",
           ("tests/test_moments.py",),
           "AdaGrad keeps only the last squared gradient"),
    Mutant("adam_form_second_moment_decay", MO,
           "    nu = _common.ema(state.nu, jax.tree.map(_common.sq_stat, updates),"
           " b2)\n    return _precondition(mu, nu, updates)",
           "    nu = _common.ema(state.nu, jax.tree.map(_common.sq_stat, updates),"
           " b1)\n    return _precondition(mu, nu, updates)",
           ("tests/test_moments.py",),
           "LightSAM-III's second moment decays with b1"),
    # ------------------------------------------------------------ msam
    Mutant("msam_adamw_decay_schedule_late", MS,
           "decay = _common.value_at(learning_rate, state.count) * weight_decay",
           "decay = _common.value_at(learning_rate, state.count + 1)"
           " * weight_decay",
           ("tests/test_msam.py",),
           "MSAM-AdamW's decay reads the lr schedule one step late",
           quick=True),
    Mutant("msam_undo_sign", MS,
           "lambda s, u, r: s + u - r, step, undo, redo)",
           "lambda s, u, r: s - u - r, step, undo, redo)",
           ("tests/test_msam.py",),
           "MSAM adds the old perturbation again instead of removing it"),
    Mutant("msam_rho_schedule_late", MS,
           "    new_rho = _common.rho_at(rho, state.count)",
           "    new_rho = _common.rho_at(rho, count)",
           ("tests/test_msam.py",),
           "MSAM's new perturbation reads the rho schedule one step late"),
    Mutant("msam_adamw_decay_at_held_weights", MS,
           "lambda s, x, u: (s - decay * (x + u + s)).astype(s.dtype),",
           "lambda s, x, u: (s - decay * (x + s)).astype(s.dtype),",
           ("tests/test_msam.py",),
           "MSAM-AdamW decays the perturbed weights, not the clean ones"),
    Mutant("unperturb_sign", MS,
           "    return param + (state.scale * momentum.astype(",
           "    return param - (state.scale * momentum.astype(",
           ("tests/test_msam.py",),
           "unperturb moves the wrong way"),
    # ------------------------------------------------------------ perturbations
    Mutant("sam_no_eps", P,
           "    step = rho_t / (denominator + eps)",
           "    step = rho_t / denominator",
           ("tests/test_family.py", "tests/test_perturbations.py"),
           "zero gradient gives 0/0 in SAM's ascent", quick=True),
    Mutant("asam_t_once", P,
           "      direction = jax.tree.map(jnp.multiply, scales, weighted)",
           "      direction = weighted",
           ("tests/test_aliases.py", "tests/test_perturbations.py"),
           "ASAM's ascent T g instead of T^2 g"),
    Mutant("asam_without_eta", P,
           "lambda x, d: jnp.abs(x.astype(d.dtype)) + eta, params, direction)",
           "lambda x, d: jnp.abs(x.astype(d.dtype)), params, direction)",
           ("tests/test_aliases.py", "tests/test_perturbations.py"),
           "ASAM ignores eta"),
    Mutant("sam_reported_norm", P,
           "            if adaptive else step * denominator)",
           "            if adaptive else denominator)",
           ("tests/test_perturbations.py",),
           "SAM reports n(g) as the perturbation norm"),
    Mutant("lightsam_without_rho", P,
           "    perturbation = jax.tree.map(lambda d: d * rho_t, direction)",
           "    perturbation = jax.tree.map(lambda d: d, direction)",
           ("tests/test_perturbations.py",),
           "LightSAM's ascent ignores rho"),
    Mutant("gsam_sign", P,
           "lambda gx, hx: hx - weight * (gx - along_h * hx),",
           "lambda gx, hx: hx + weight * (gx - along_h * hx),",
           ("tests/test_family.py",),
           "GSAM ascends the surrogate gap"),
    Mutant("wsam_weight", P,
           "weight_of_g = (1 - 2 * gamma) / (1 - gamma)  # 1 - a",
           "weight_of_g = gamma / (1 - gamma)  # 1 - a",
           ("tests/test_family.py",),
           "WSAM weighs g by a instead of 1 - a"),
    Mutant("friendly_first_step_decay", P,
           "    decay = jnp.where(count == 0, 0.0, lmbda)",
           "    decay = lmbda",
           ("tests/test_family.py",),
           "Friendly-SAM's m starts at (1 - lmbda) g instead of g"),
    Mutant("friendly_without_sigma", P,
           "lambda g, m: g - (sigma * m).astype(g.dtype), grads, inner.momentum)",
           "lambda g, m: g - m.astype(g.dtype), grads, inner.momentum)",
           ("tests/test_family.py",),
           "Friendly-SAM removes the whole running mean whatever sigma"),
    Mutant("looksam_phase", P,
           "take_second_pass = state.count % every == 0",
           "take_second_pass = state.count % every == 1",
           ("tests/test_family.py",),
           "LookSAM takes its second pass one step late in each cycle"),
    Mutant("looksam_without_alpha", P,
           "return alpha * g_norm / (inner.g_v_norm + eps), inner.g_v",
           "return g_norm / (inner.g_v_norm + eps), inner.g_v",
           ("tests/test_family.py",),
           "LookSAM reuses g_v with weight 1 whatever alpha"),
    Mutant("looksam_g_v_sign", P,
           "g_v = jax.tree.map(lambda bx, fx: fx - along_base * bx, base, full)",
           "g_v = jax.tree.map(lambda bx, fx: fx + along_base * bx, base, full)",
           ("tests/test_family.py",),
           "LookSAM stores h plus, not minus, its part along g"),
    Mutant("cosine_denominator", P,
           "return g_norm, h_norm, inner_product / (g_norm * h_norm + eps)",
           "return g_norm, h_norm, inner_product / (g_norm + eps)",
           ("tests/test_family.py",),
           "GSAM/LookSAM's cosine not divided by n(h)"),
    Mutant("two_pass_without_pmean", P,
           "    if axis_name is not None:\n"
           "      output = _common.pmean_varying(output, axis_name)\n"
           "    return output, PerturbationState(",
           "    return output, PerturbationState(",
           ("tests/test_family.py::test_axis_name_averages_the_per_device_outputs",
            "tests/test_perturbations.py"),
           "axis_name no longer averages the output over devices"),
    Mutant("global_h_not_averaged_by_the_rule", P,
           "          axis_name=axis_name if global_perturbation else None, who=who)",
           "          axis_name=None, who=who)",
           ("tests/test_multi_device_recipe.py",),
           "a hand-written step averaging only g applies GSAM's rule per device"),
    Mutant("rho_zero_second_pass_not_skipped", P,
           "jnp.logical_and(take_second_pass, jnp.logical_not(rho_is_zero))",
           "take_second_pass",
           ("tests/test_rho_zero.py",),
           "a scheduled rho_t = 0 still calls grad_fn (two passes)"),
    Mutant("two_pass_count_frozen", P,
           "count=optax.safe_increment(state.count), perturbation_norm=norm,",
           "count=state.count, perturbation_norm=norm,",
           ("tests/test_family.py", "tests/test_perturbations.py"),
           "the step count never advances (rho schedules stuck at step 0)"),
    # ------------------------------------------------------------ wrappers
    Mutant("lookahead_slow_step", W,
           "lambda diff: slow_step_size * sync_next * diff, last_difference)",
           "lambda diff: (1 - slow_step_size) * sync_next * diff,"
           " last_difference)",
           ("tests/test_wrappers.py",),
           "Lookahead moves the slow weights by 1 - alpha", quick=True),
    Mutant("lookahead_sync_period", W,
           "sync_next = state.steps_since_sync == (sync_period - 1)",
           "sync_next = state.steps_since_sync == sync_period",
           ("tests/test_wrappers.py",),
           "Lookahead never (or one step late) synchronises"),
    Mutant("lookahead_msam_perturbed_sync", W,
           "lambda f, s, slow: f + s - slow, new_fast, shift, params.slow)",
           "lambda f, s, slow: f - slow, new_fast, shift, params.slow)",
           ("tests/test_wrappers.py",),
           "Lookahead over MSAM averages the perturbed fast weights"),
    # ------------------------------------------------------------ guards
    Mutant("guard_ignores_outgoing_updates", G,
           "finite = jnp.logical_and(_all_finite(updates), _all_finite(new_updates))",
           "finite = _all_finite(updates)",
           ("tests/test_fidelity.py", "tests/test_reliability.py"),
           "a NaN at the perturbed point slips through samtx.apply_if_finite",
           quick=True),
    Mutant("guard_never_gives_up", G,
           "accept = jnp.logical_or(finite, notfinite_count > max_consecutive_errors)",
           "accept = finite",
           ("tests/test_fidelity.py", "tests/test_reliability.py"),
           "a broken run stalls forever instead of failing loudly"),
    Mutant("guard_total_count", G,
           "                optax.safe_increment(state.total_notfinite)),",
           "                state.total_notfinite),",
           ("tests/test_fidelity.py",),
           "total_notfinite never counts"),
    # ------------------------------------------------------------ parallel
    Mutant("average_is_sum", PAR,
           "    average = lambda x: jax.lax.pmean(x, axis_name)",
           "    average = lambda x: jax.lax.psum(x, axis_name)",
           ("tests/test_parallel.py",),
           "device averages (state, statistics, metrics) are sums",
           quick=True),
    Mutant("global_gradient_not_averaged", PAR,
           "    return jax.lax.pmean(grads, self.axis_name)",
           "    return grads",
           ("tests/test_parallel.py",),
           "one global perturbation built from each device's own gradient"),
    Mutant("global_h_not_averaged_by_the_step", PAR,
           "      return jax.lax.pmean(grad_fn(params), self.axis_name)",
           "      return grad_fn(params)",
           ("tests/test_parallel_aliases.py",),
           "one global perturbation: pmap_step's rule sees each device's h"),
    Mutant("state_not_settled", PAR,
           "    return _average_perturbation_state(opt_state, self.axis_name)",
           "    return opt_state",
           ("tests/test_parallel.py",),
           "per-device ascent statistics drift apart"),
    # ------------------------------------------------------------ aliases
    Mutant("adasam_ignores_delayed", AL,
           "                                     norm_axis_name=norm_axis_name),\n"
           "      moments.scale_by_amsgrad(b1, b2, eps, delayed=delayed),",
           "                                     norm_axis_name=norm_axis_name),\n"
           "      moments.scale_by_amsgrad(b1, b2, eps, delayed=False),",
           ("tests/test_aliases.py", "tests/test_fidelity_round3.py"),
           "samtx.adasam(delayed=True) silently runs Algorithm 1"),
    Mutant("sgd_momentum_nesterov_dropped", AL,
           "  return optax.trace(decay=momentum, nesterov=nesterov)",
           "  return optax.trace(decay=momentum)",
           ("tests/test_aliases.py",),
           "the SGD aliases ignore nesterov"),
    # ------------------------------------------------------------ sharpness
    Mutant("sharpness_gap_radius", SH,
           "  scale = rho / (norm + eps)",
           "  scale = 1.0 / (norm + eps)",
           ("tests/test_sharpness.py",),
           "the perturbed-loss gap is measured at radius 1, not rho"),
    # ------------------------------------------------------------ flax
    Mutant("flax_batch_stats_dropped", FL,
           "new_state = new_state.replace(batch_stats=axis.mean(new_batch_stats))",
           "new_state = new_state.replace(batch_stats=axis.mean(batch_stats))",
           ("tests/test_flax.py::"
            "test_linen_batchnorm_stats_from_clean_pass_and_perturbed_pass_in_train_mode",),
           "linen BatchNorm statistics never updated by the step"),
    # ------------------------------------- related work, the compare job
    Mutant("fgsam_plus_orthogonal_roles", P,
           "return g_s, _orthogonal_part(g_s, m, eps, axis_name, norm_axis_name)",
           "return g_s, _orthogonal_part(m, g_s, eps, axis_name, norm_axis_name)",
           ("tests/test_fgsam.py::test_fgsam_plus_matches_reference",),
           "FGSAM+ stores the peer gradient's part orthogonal to FGSAM's,"
           " not the other way round"),
    Mutant("fgsam_plus_mix", P,
           "lam * hx + (1 - lam) * gx, g_graph, h)",
           "(1 - lam) * hx + lam * gx, g_graph, h)",
           ("tests/test_fgsam.py::test_fgsam_plus_matches_reference",),
           "FGSAM+ weighs the graph and peer gradients the wrong way round"),
    Mutant("graph_grad_fn_shape_unchecked", C,
           "if jnp.shape(o) != jnp.shape(g):",
           "if False:",
           ("tests/test_fgsam.py::"
            "test_fgsam_plus_needs_graph_grad_fn_with_a_clear_error",
            "tests/test_perturbations.py"),
           "a gradient function's wrong leaf shape passes (broadcast)"),
    Mutant("gpa_z_frozen", "samtx/gpa.py",
           "z=optax.apply_updates(state.z, base_updates),\n"
           "        train_interp=jnp.asarray(mu_y",
           "z=state.z,\n        train_interp=jnp.asarray(mu_y",
           ("tests/test_gpa.py",),
           "GPA's base iterate z never moves"),
    Mutant("recommend_time_noise_decides", "samtx/compare/pages.py",
           "and _same_time(rows[n], rows[fastest])))",
           "and False))",
           ("tests/test_compare_pages.py",),
           "a step-time difference inside the timing spread picks the"
           " worse of two tied optimizers"),
    Mutant("tuned_nearest_level_ignores_the_optimizer", "samtx/compare/tune.py",
           "for k, v in by_noise.items() if name in v}",
           "for k, v in by_noise.items()}",
           ("samtx/compare/tune.py", "tests/test_compare_cli.py"),
           "an optimizer tuned at another noise level only is not found"),
)


def check_mutants(mutants=MUTANTS, root=ROOT) -> list:
  """Problems with the list: names, originals not found exactly once."""
  problems, seen = [], set()
  for m in mutants:
    if m.name in seen:
      problems.append(f"{m.name}: duplicate name")
    seen.add(m.name)
    if m.original == m.mutated:
      problems.append(f"{m.name}: the mutant changes nothing")
    text = (root / m.path).read_text()
    count = text.count(m.original)
    if count != 1:
      problems.append(f"{m.name}: original text found {count} times in {m.path}")
  return problems


def _run_tests(workdir, tests, timeout):
  """(status, seconds, last output line) of ``pytest -x`` on ``tests``."""
  env = {**os.environ, "PYTHONPATH": str(workdir), "JAX_PLATFORMS": "cpu"}
  start = time.time()
  proc = subprocess.Popen(
      [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0",
       "-p", "no:randomly", *tests],
      cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return "timeout", time.time() - start, ""
  lines = [line for line in out.strip().splitlines() if line.strip()]
  last = lines[-1] if lines else ""
  # pytest: 0 all passed, 1 some failed, 2 collection errors (the mutated
  # package does not import), 5 nothing collected (a bad test id).
  status = {0: "survived", 1: "killed", 2: "killed"}.get(proc.returncode,
                                                         f"error {proc.returncode}")
  return status, time.time() - start, last


def _log(message):
  print(message, flush=True)


def run(mutants, timeout, log=_log):
  """Runs each mutant on a fresh copy of the repository; returns rows."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="samtx-mutants-") as tmp:
    workdir = pathlib.Path(tmp) / "repo"
    shutil.copytree(ROOT, workdir, ignore=IGNORED)
    probe = subprocess.run(
        [sys.executable, "-c", "import samtx; print(samtx.__file__)"],
        cwd=workdir, env={**os.environ, "PYTHONPATH": str(workdir)},
        capture_output=True, text=True, check=True)
    if not probe.stdout.strip().startswith(str(workdir)):
      raise RuntimeError(f"the copy's samtx is not the one imported:"
                         f" {probe.stdout.strip()}")
    for m in mutants:
      path = workdir / m.path
      text = path.read_text()
      path.write_text(text.replace(m.original, m.mutated, 1))
      try:
        status, seconds, last = _run_tests(workdir, m.tests, timeout)
      finally:
        path.write_text(text)
      rows.append({"name": m.name, "path": m.path, "status": status,
                   "seconds": seconds, "tests": " ".join(m.tests),
                   "why": m.why, "last": last})
      log(f"{status:9s} {seconds:6.0f}s  {m.name}  ({m.why})")
  return rows


def report(rows, command, wall):
  counts = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  lines = ["# Mutation report", "",
           f"Command: `{command}`", "",
           f"Wall time: {wall:.0f} s ({wall / 60:.1f} min) for {len(rows)}"
           " mutants.", "",
           "Summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
           "", "| mutant | file | status | s | bug | tests |",
           "|---|---|---|---|---|---|"]
  cell = lambda text: text.replace("|", "\\|")  # a table cell
  lines += [f"| `{r['name']}` | `{r['path']}` | {r['status']} |"
            f" {r['seconds']:.0f} | {cell(r['why'])} | `{r['tests']}` |"
            for r in rows]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--list", action="store_true", help="list the mutants")
  parser.add_argument("--only", action="append", default=[], metavar="NAME",
                      help="run only this mutant (repeatable)")
  parser.add_argument("--quick", action="store_true",
                      help="only the quick subset (one or two per module)")
  parser.add_argument("--timeout", type=float, default=900.0,
                      help="seconds per mutant (default 900)")
  parser.add_argument("--report", type=pathlib.Path,
                      help="also write a markdown report here")
  args = parser.parse_args(argv)
  problems = check_mutants()
  if problems:
    parser.error("the mutant list is stale:\n  " + "\n  ".join(problems))
  if args.list:
    for m in MUTANTS:
      print(f"{m.name:34s} {m.path:24s} {'quick ' if m.quick else ''}{m.why}")
    return 0
  chosen = [m for m in MUTANTS if (not args.only or m.name in args.only)
            and (not args.quick or m.quick)]
  unknown = set(args.only) - {m.name for m in MUTANTS}
  if unknown:
    parser.error(f"unknown mutants: {sorted(unknown)} (see --list)")
  start = time.time()
  rows = run(chosen, args.timeout)
  wall = time.time() - start
  command = "python tools/mutate.py " + " ".join(argv if argv is not None
                                                   else sys.argv[1:])
  text = report(rows, command.strip(), wall)
  print(text)
  if args.report:
    args.report.write_text(text)
  return 1 if any(r["status"] == "survived" for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
