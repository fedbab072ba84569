"""The Ray Data processor (``icecache_ray.data``): a read → processor → rows pipeline on a local
loopback Ray with the tiny model; failing rows carry an error instead of stopping the pipeline."""

import pytest

from icecache_ray.data import IceCacheEngineProcessorConfig, build_processor

ray = pytest.importorskip("ray")
pytest.importorskip("pandas")  # ray[data]


@pytest.fixture(scope="module")
def local_ray():
    from icecache_ray import ray_utils

    ray_utils.connect(num_cpus=2, object_store_memory=100 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 0, "batch_size=0"),
    ("policy", "magic", "policy='magic'"),
    ("budget", 250, "budget=250"),
    ("num_cpus", -1, "num_cpus=-1"),
])
def test_config_is_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        IceCacheEngineProcessorConfig(**{field: value})


def test_processor_generates_like_generate_batch_and_keeps_bad_rows(local_ray, tiny_model_dir):
    from icecache_ray import IceCacheConfig, generate_batch
    from icecache_ray.model import load_model

    model, tok = load_model(tiny_model_dir)
    texts = ["the quick brown fox " * (5 + 3 * i) for i in range(5)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = [{"id": f"d{i}", "prompt": t} for i, t in enumerate(texts)]
    rows += [{"id": "empty", "prompt": "   "}, {"id": "bad_ids", "prompt": "", "prompt_ids": [1, 10**6]}]
    config = IceCacheEngineProcessorConfig(model_source=str(tiny_model_dir), budget=64, max_new_tokens=6, max_running=3,
                                           batch_size=2, max_concurrent_batches=2, num_cpus=1)
    processor = build_processor(config, postprocess=lambda row: {"id": row["id"], "ids": list(row["generated_ids"]),
                                                                 "error": row["error"], "text": row["generated_text"]})
    out = {r["id"]: r for r in processor(ray.data.from_items(rows)).take_all()}
    assert set(out) == {f"d{i}" for i in range(5)} | {"empty", "bad_ids"}  # every row, exactly once
    expected = generate_batch(model, ids, IceCacheConfig(budget=64), max_new_tokens=6, eos_token_id=tok.eos_token_id)
    for i, res in enumerate(expected):
        assert out[f"d{i}"]["error"] is None and out[f"d{i}"]["ids"] == res.token_ids
    assert "no non-empty 'prompt_ids', 'messages' or 'prompt'" in out["empty"]["error"]
    assert "token 1 is 1000000" in out["bad_ids"]["error"]
