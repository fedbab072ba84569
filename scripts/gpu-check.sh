#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA device, in one run of at most 8 minutes (step
# timeouts below sum to 7 min), with its JSON under docs/results/gpu/<date>-<device>/. Run it
# whenever a GPU machine is lent; CI never has one (every piece it calls runs on CPU at toy size
# in tests/: test_bench, test_capacity, test_sizing, test_shapes, test_pool16). Exits non-zero if
# there is no CUDA device or any step fails (later steps still run; a step cut by its timeout
# leaves its keys of capacity.json null, and its log says how far it got).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_NODE_IP_ADDRESS=127.0.0.1 GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-1000}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device visible to torch" >&2
  exit 2
fi
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out="docs/results/gpu/$(date +%F)-$name"
mkdir -p "$out"
"$PY" - > "$out/device.json" <<'PYEOF'
import json, platform, numba, torch, transformers
try:
    import cupy
    cupy_version, cupy_ok = cupy.__version__, bool(cupy.cuda.is_available())
except Exception as exc:  # noqa: BLE001 - recorded, not fatal here
    cupy_version, cupy_ok = f"unavailable: {exc}", False
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "transformers": transformers.__version__, "numba": numba.__version__, "cupy": cupy_version, "cupy_cuda_available": cupy_ok,
                  "python": platform.python_version()}, indent=2))
PYEOF
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, remember a failure
  local label=$1 limit=$2; shift 2
  echo "== $label" >&2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$label.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s (log: $out/$label.log)" >&2
  [ $rc -eq 0 ] || status=1
}
step tests 90 "$PY" -m pytest -q -m "not slow" tests/test_bulk_copy.py tests/test_engine.py tests/test_pool16.py tests/test_device_select.py -k "cuda or cupy or bfloat16" -rs
# Random weights (a lent machine has neither the bundled model nor ../shared), bf16 model, rows
# and host pool (--dtype defaults to bfloat16 on CUDA). 1) No cap, 8k: engine full vs
# transformers' DynamicCache at B1 / B8, icecache@256 vs full at B8 (steady state).
step nocap 75 "$PY" -m icecache_ray.bench.throughput --random-weights --device cuda --shape smollm2 --context 8192 \
  --docs 8 --max-running 1,8 --policies full,icecache --skip-e2e --skip-ray --json "$out/nocap.json"
# 2) Capacity, SmolLM2 8k: a device KV budget of 2.8 GiB holds 15 full-cache rows of 8321 tokens
# (191.7 MB each in bf16); icecache@256 gets the rows the same budget holds (test_sizing: ~5x).
# End to end, 128 new tokens, as many documents as the most rows given.
step capacity 130 "$PY" -m icecache_ray.bench.throughput --random-weights --device cuda --shape smollm2 --context 8192 \
  --new-tokens 128 --device-kv-gib 2.8 --policies full,icecache --skip-steady --skip-hf --skip-ray --json "$out/capacity-smollm2.json"
# 3) Llama-3-8B shape at 32k, budget 1024, 20 GiB of device KV (full: 4 rows of 4.3 GB; icecache
# ~18): as far as 120 s allow. Cut for time: 64 new tokens instead of 128 (said in capacity.json).
step llama8b 120 "$PY" -m icecache_ray.bench.throughput --random-weights --device cuda --shape llama-8b --context 32768 \
  --budget 1024 --new-tokens 64 --device-kv-gib 20 --policies full,icecache --skip-steady --skip-hf --skip-ray \
  --json "$out/capacity-llama8b.json"
step summary 20 "$PY" -m icecache_ray.bench.capacity --nocap "$out/nocap.json" --capacity "$out/capacity-smollm2.json" \
  --capacity "$out/capacity-llama8b.json" --json "$out/capacity.json"
echo "gpu-check: results in $out (status $status)" >&2
exit $status
