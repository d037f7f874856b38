#!/usr/bin/env bash
# The whole GPU benchmark + GPU test set in one call (issue 8), for a session with a GPU.
#
# Runs on the device machine from the repo root (python3 there has torch + CUDA but not
# diffusers/pydantic): installs carried wheels if an import fails, runs the GPU-marked tests,
# then every `bigasp bench` at SDXL size, one process per bench (an OOM in one does not stop
# the rest), each under its own time limit so the whole script ends inside a 10-minute call.
#
# Once, here (with internet), fetch the wheels the GPU image lacks:
#     scripts/gpu_check.sh --fetch-wheels          # -> .whl/ (git-ignored, ~15 MB)
# Then, device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Results come back under $OUT: log.txt, results.jsonl (one JSON record per bench), rows.md
# (pasteable rows for docs/PERFORMANCE.md), pytest.txt.
set -u -o pipefail
cd "$(dirname "$0")/.."
WHEELS=${BIGASP_WHEELS:-.whl}
OUT=${OUT:-/tmp/bigasp-gpu-check}
mkdir -p "$OUT" "$OUT/json"
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    grep -qs "^/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >>.git/info/exclude 2>/dev/null || true
    # Pure-python ones, then the two compiled ones for the device's CPython 3.12 / manylinux x86-64.
    $PY -m pip download -q --no-deps -d "$WHEELS" diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer \
        pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5 typer==0.29.2 || exit 1
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" pydantic_core==2.50.4 zstandard==0.25.0 || exit 1
    ls -la "$WHEELS"
    exit 0
fi

exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! $PY -c "import diffusers, pydantic, zstandard" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "diffusers/pydantic/zstandard missing and no wheels in $WHEELS: run scripts/gpu_check.sh --fetch-wheels here and carry $WHEELS"
        exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" || exit 2

START=$SECONDS
BUDGET=${BIGASP_GPU_BUDGET_S:-570}  # the device tool's call limit is 600 s: stop starting benches before it
bench() {  # bench LIMIT_S NAME ARGS... : one bench in its own process, JSON to $OUT/json/NAME.json
    local limit=$1 name=$2 left
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then echo "!!! $name skipped: out of the time budget"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name: bigasp bench $*"
    timeout "$limit" $PY -m bigasp bench "$@" --json "$OUT/json/$name.json" | tee -a "$OUT/rows.md" | grep -v '^|---' || echo "!!! $name failed or timed out (rc=$?)"
}

# Every engineer's GPU-marked tests first (tiny models; seconds each).
timeout 120 $PY -m pytest -q -m gpu tests -p no:cacheprovider >"$OUT/pytest.txt" 2>&1
echo "gpu tests rc=$? (details in pytest.txt)"; tail -3 "$OUT/pytest.txt"

SDXL="--arch sdxl-base --device cuda"
# In priority order (later ones are skipped if the budget runs out).
# Train step, UNet + TE1, 1024², 231 tokens (bigASP recipe). No-GC max batch on 80 GB is ~5 (reference §5).
bench 120 train_b4_bf16 train $SDXL --res 1024x1024 --device-batch 4 --precision bf16 --tokens 231 --iters 8
# VAE encode 1024² (targets: bf16 >= 60 img/s, fp32 >= 30 img/s).
bench 60 encode_bf16 encode $SDXL --res 1024x1024 --batch 8 --precision bf16 --iters 5
bench 60 encode_fp32 encode $SDXL --res 1024x1024 --batch 8 --precision fp32 --iters 5
# Sampling 1024², euler, CFG and CFG+PAG, batch 1 and 4, bigasp vs diffusers in one process.
bench 150 sample sample $SDXL --res 1024x1024 --batches 1,4 --steps 5,15 --repeats 2
bench 200 train_b4_bf16_compile train $SDXL --res 1024x1024 --device-batch 4 --precision bf16 --tokens 231 --iters 8 --compile
bench 120 train_b16_bf16_ckpt train $SDXL --res 1024x1024 --device-batch 16 --precision bf16 --tokens 231 --iters 4 --checkpointing
bench 120 train_b8_fsdp train $SDXL --res 1024x1024 --device-batch 8 --precision bf16 --tokens 231 --iters 4 --fsdp
# Peak training memory (bench memory): the fake-tensor estimate and the real step's
# torch.cuda.max_memory_allocated (--measure) side by side, for the configs in docs/PERFORMANCE.md.
bench 240 memory_cluster_b4 memory $SDXL --res 1024x1024 --batch 4 --recipe cluster --measure
# The 24 GB modes: LoRA rank 32 (attention + FF, UNet only) and the lean full finetune (bf16 + Adafactor fused).
bench 150 memory_lora_b1 memory $SDXL --res 1024x1024 --batch 1 --recipe lora --measure
bench 150 memory_lean_b1 memory $SDXL --res 1024x1024 --batch 1 --recipe lean --measure
# Host side on the device's CPU: loader samples/s per worker at SDXL latent size.
bench 60 load load --latent 128x128 --images 512 --batch 16 --batches 20

for f in "$OUT"/json/*.json; do $PY -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$f"; done >"$OUT/results.jsonl"
rm -rf "$OUT/json"
echo "=== rows"; grep '^| [a-z]' "$OUT/rows.md" | grep -v '^| Bench'
