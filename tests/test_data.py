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
    ("index_mode", "threads", "index_mode='threads'"),
    ("stages", 0, "stages=0"),
])
def test_config_is_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        IceCacheEngineProcessorConfig(**{field: value})


def test_in_process_engine_cannot_span_stages():
    with pytest.raises(ValueError, match="stages=2: more than one stage needs index_mode 'actors'"):
        IceCacheEngineProcessorConfig(index_mode="in_process", stages=2)


def test_auto_index_mode_is_actors_on_nodes_of_8_cpus_or_more():
    from icecache_ray.data import resolve_index_mode

    assert resolve_index_mode("auto", 2) == "in_process"
    assert resolve_index_mode("auto", 7.5) == "in_process"
    assert resolve_index_mode("auto", 8) == "actors"
    assert resolve_index_mode("auto", 2, stages=2) == "actors"  # only stage workers can split a replica
    assert resolve_index_mode("in_process", 64) == "in_process" and resolve_index_mode("actors", 1) == "actors"


def test_processor_generates_like_generate_batch_and_keeps_bad_rows(local_ray, tiny_model_dir):
    from icecache_ray import IceCacheConfig, generate_batch
    from icecache_ray.model import load_model

    model, tok = load_model(tiny_model_dir)
    texts = ["the quick brown fox " * (5 + 3 * i) for i in range(5)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = [{"id": f"d{i}", "prompt": t} for i, t in enumerate(texts)]
    rows += [{"id": "empty", "prompt": "   "}, {"id": "bad_ids", "prompt": "", "prompt_ids": [1, 10**6]}]
    config = IceCacheEngineProcessorConfig(model_source=str(tiny_model_dir), budget=64, max_new_tokens=6, max_running=3,
                                           batch_size=2, max_concurrent_batches=2, num_cpus=1, index_mode="in_process")
    processor = build_processor(config, postprocess=lambda row: {"id": row["id"], "ids": list(row["generated_ids"]),
                                                                 "error": row["error"], "text": row["generated_text"]})
    out = {r["id"]: r for r in processor(ray.data.from_items(rows)).take_all()}
    assert set(out) == {f"d{i}" for i in range(5)} | {"empty", "bad_ids"}  # every row, exactly once
    expected = generate_batch(model, ids, IceCacheConfig(budget=64), max_new_tokens=6, eos_token_id=tok.eos_token_id)
    for i, res in enumerate(expected):
        assert out[f"d{i}"]["error"] is None and out[f"d{i}"]["ids"] == res.token_ids
    assert "no non-empty 'prompt_ids', 'messages' or 'prompt'" in out["empty"]["error"]
    assert "token 1 is 1000000" in out["bad_ids"]["error"]


@pytest.mark.parametrize("stages", [1, 2])
def test_processor_with_index_actors_gives_the_in_process_tokens(local_ray, never_eos_model_dir, stages):
    """index_mode="actors": each engine actor drives a Ray-runtime replica (stage workers + index
    actors, the Deployment's code); same greedy tokens as the in-process engine."""
    from icecache_ray import IceCacheConfig, generate_batch
    from icecache_ray.model import load_model

    model, tok = load_model(never_eos_model_dir)
    texts = ["a long list of numbers " + " ".join(str(n) for n in range(7 * i, 7 * i + 40 + 9 * i)) for i in range(4)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    config = IceCacheEngineProcessorConfig(model_source=str(never_eos_model_dir), budget=64, max_new_tokens=6, max_running=3,
                                           batch_size=2, max_concurrent_batches=2, num_cpus=1, index_mode="actors",
                                           stages=stages)
    processor = build_processor(config, postprocess=lambda row: {"id": row["id"], "ids": list(row["generated_ids"]),
                                                                 "error": row["error"]})
    out = {r["id"]: r for r in processor(ray.data.from_items([{"id": f"d{i}", "prompt_ids": p} for i, p in enumerate(ids)])).take_all()}
    expected = generate_batch(model, ids, IceCacheConfig(budget=64), max_new_tokens=6, eos_token_id=tok.eos_token_id)
    for i, res in enumerate(expected):
        assert out[f"d{i}"]["error"] is None and out[f"d{i}"]["ids"] == res.token_ids


class _Handle:
    """A stand-in for an actor handle over a plain object: ``handle.method.remote(...)`` awaitable."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        method = getattr(self._target, name)

        class _Method:
            @staticmethod
            def remote(*args):
                import asyncio

                future = asyncio.get_running_loop().create_future()
                future.set_result(method(*args))
                return future

        return _Method


def test_a_batch_whose_replica_died_max_attempts_times_comes_back_as_errors(tiny_model_dir):
    """The stage's retry limit, in one process: Ray Data resubmits a dead actor's batches forever."""
    import asyncio

    from icecache_ray.data import IceCacheEngineStage
    from icecache_ray.data.attempts import Attempts, batch_key
    from icecache_ray.data.columns import object_column

    config = IceCacheEngineProcessorConfig(model_source=str(tiny_model_dir), budget=64, max_new_tokens=3, max_running=2,
                                           index_mode="in_process")
    ledger = Attempts()
    stage = IceCacheEngineStage(config, attempts=_Handle(ledger))
    try:
        batch = {"id": object_column(["a", "b"]), "prompt_ids": object_column([[5, 6, 7, 8], [9, 10, 11]])}
        first = asyncio.run(stage(batch))
        assert list(first["error"]) == [None, None] and all(n > 0 for n in first["generated_tokens"])
        assert ledger.in_flight() == 0  # returned rows: forgotten
        key = batch_key(batch)
        ledger.begin(key), ledger.begin(key)  # two attempts of this batch died with their replica
        third = asyncio.run(stage(batch))
        assert all("died 2 time(s)" in e for e in third["error"]) and list(third["generated_tokens"]) == [0, 0]
        assert ledger.in_flight() == 0
    finally:
        stage.close()
