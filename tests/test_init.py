"""The public surface: DESIGN.md's names are exported; submodules load lazily."""

import subprocess
import sys

import pytest

import samtx

DESIGN_NAMES = ["sam_perturbation", "lightsam_perturbation", "scale_by_amsgrad",
                "sam", "adasam", "amsgrad", "lightsam", "msam", "unperturb"]


def test_design_names_exported_and_callable():
  for name in DESIGN_NAMES:
    assert name in samtx.__all__
    assert callable(getattr(samtx, name))
  for name in samtx.__all__:
    assert hasattr(samtx, name), name


def test_submodules_load_on_first_use_only():
  code = ("import sys, samtx; assert 'flax' not in sys.modules;"
          " samtx.parallel.pmap_step; samtx.sharpness.top_hessian_eigenvalue;"
          " samtx.flax.make_grad_fn; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "ok"


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_thing"):
    samtx.no_such_thing  # noqa: B018
