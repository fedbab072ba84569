"""The top-level ``kernels/`` folder (installed as ``icecache_ray.kernels``) must not shadow the
Hugging Face ``kernels`` package that transformers imports when code runs from the checkout
(``python -m`` there, and Ray workers, which put the driver's working directory on sys.path)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="the Hugging Face kernels package is not installed")
def test_import_kernels_from_the_checkout_gets_the_installed_package():
    code = "import kernels, icecache_ray.kernels.mdci as m; print(kernels.__file__); print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    hf, ours = out.stdout.split()
    assert not hf.startswith(str(ROOT / "kernels")), hf
    assert ours.startswith(str(ROOT / "kernels")), ours


def test_transformers_models_import_from_the_checkout():
    code = "from transformers import LlamaConfig; print(LlamaConfig().model_type)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "llama"


_OPENBLAS_THREADS = """
import ctypes, os
import icecache_ray, numpy
lib = next(line.split()[-1] for line in open('/proc/self/maps') if 'openblas' in line.lower())
blas = ctypes.CDLL(lib)
getter = next(getattr(blas, name) for name in ('scipy_openblas_get_num_threads64_', 'openblas_get_num_threads64_',
                                                'openblas_get_num_threads') if hasattr(blas, name))
print(os.environ['OPENBLAS_NUM_THREADS'], getter())
"""


@pytest.mark.parametrize("user_value, expected", [(None, "1 1"), ("2", "2 2")])
def test_importing_the_package_pins_numpy_openblas_threads_unless_the_user_set_them(user_value, expected):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if user_value is not None:
        env["OPENBLAS_NUM_THREADS"] = user_value
    out = subprocess.run([sys.executable, "-c", _OPENBLAS_THREADS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0 and "StopIteration" in out.stderr:
        pytest.skip("this NumPy is not linked against OpenBLAS")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == expected.split()
