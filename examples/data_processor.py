"""Summarize the example corpus with the icecache processor inside a plain Ray Data pipeline.

    python examples/data_processor.py [--input examples/corpus.jsonl] [--output out/processor]

Starts a local Ray on loopback (or joins $RAY_ADDRESS), reads the JSONL with Ray Data, builds the
chat prompt in ``preprocess``, generates with one engine replica (IceCache at a 256-token budget,
8 sequences decoding at once) and writes Parquet; rows that failed keep their reason in ``error``.
"""

import argparse
import logging

import ray

from icecache_ray import ray_utils
from icecache_ray.data import IceCacheEngineProcessorConfig, build_processor
from icecache_ray.jobs.prompts import DEFAULT_INSTRUCTION


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="examples/corpus.jsonl")
    p.add_argument("--output", default="out/processor")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    ray_utils.connect()
    config = IceCacheEngineProcessorConfig(budget=256, max_new_tokens=args.max_new_tokens, max_running=8, batch_size=4,
                                           concurrency=1, max_concurrent_batches=3, num_cpus=1, threads=2)
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"],
                                "messages": [{"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\n{row['text']}"}]},
        postprocess=lambda row: {"id": row["id"], "summary": row["generated_text"], "prompt_tokens": row["prompt_tokens"],
                                 "generated_tokens": row["generated_tokens"], "error": row["error"]},
    )
    processor(ray.data.read_json(args.input)).write_parquet(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
