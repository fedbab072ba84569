"""Test-session guards: Ray stays on loopback; no shared-memory segment of ours may leak."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import pytest  # noqa: E402

from icecache_ray.pool import list_leaked_segments  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Fail the session if a test left one of *this process's* ``icr_<pid>_`` segments in
    /dev/shm (other processes on the machine, e.g. a benchmark, may own ``icr_`` segments too)."""
    prefix = f"icr_{os.getpid()}_"
    before = set(list_leaked_segments(prefix))
    yield
    import gc

    gc.collect()
    leaked = sorted(set(list_leaked_segments(prefix)) - before)
    if leaked:
        pytest.fail(f"shared-memory segments leaked by the test suite: {leaked}", pytrace=False)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama with a small byte-level BPE tokenizer and a chat template
    (a stand-in for the bundled model in job tests: loads in well under a second)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 20, "Summarize the following document."], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def never_eos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model whose tokenizer's EOS is a token outside the model's vocabulary: it never
    stops early, so every document decodes ``max_new_tokens`` steps (fault tests need runs that
    last long enough to be interrupted; the tiny model otherwise often ends after one token)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("never-eos-model")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, folder / f.name)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"eos_token": "<|never|>"})
    tok.save_pretrained(folder)
    return folder
