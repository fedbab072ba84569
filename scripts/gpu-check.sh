#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA device, in one run of at most ~9 minutes, with
# its JSON under docs/results/gpu/<date>-<device>/. Run it whenever a GPU machine is lent; CI never
# has one. Exits non-zero if there is no CUDA device or any step fails (later steps still run).
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
step tests 150 "$PY" -m pytest -q -m "not slow" tests/test_bulk_copy.py tests/test_engine.py -k "cuda or cupy" -rs
step copy 60 "$PY" -m icecache_ray.bench.copy --json "$out/copy.json"
# Random weights of SmolLM2's shape: same compute per token, and a lent machine has neither the
# bundled model (over its transfer limit) nor ../shared. Token slots on and off: their row copies.
step speed 120 "$PY" -m icecache_ray.bench.speed --random-weights --device cuda --length 8192 --steps 16 \
  --token-pages default,0 --json "$out/speed.json"
step throughput 240 "$PY" -m icecache_ray.bench.throughput --random-weights --device cuda --docs 8 --max-running 1,8 \
  --e2e-running 8 --new-tokens 64 --skip-ray --json "$out/throughput.json"
echo "gpu-check: results in $out (status $status)" >&2
exit $status
