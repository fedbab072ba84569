"""The top-level ``kernels/`` folder (installed as ``icecache_ray.kernels``) must not shadow the
Hugging Face ``kernels`` package that transformers imports when code runs from the checkout
(``python -m`` there, and Ray workers, which put the driver's working directory on sys.path)."""

import importlib.util
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
