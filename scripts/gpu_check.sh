#!/usr/bin/env bash
# Proves the CUDA paths on one GPU in under 8 minutes, offline, installing nothing.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]     (default gpu_check_out/; PYTHON=... picks the interpreter)
#
# Needs torch, triton, transformers, peft, accelerate, safetensors, pyyaml, pytest; not vllm, flash-attn or
# datasets. Every step writes its log under OUT_DIR and a line to OUT_DIR/summary.txt; the exit status is
# non-zero when any step failed. Steps (time limits in seconds):
#   env       one line in summary.txt: GPU, driver, torch / triton / transformers versions
#   pytest    pytest -m gpu: compiled kernels vs float64 (offsets past 2^31, the vocab tail), packed attention,
#             a bf16 training step with the HF sampler, FSDP2 on one GPU, parity with a bf16 engine, and the
#             world-size-1 NCCL scenario (200; -v, so a timeout still shows which tests passed)
#   kernels   tests/test_kernel_*.py -m triton, compiled: every Triton op vs float64 (90; its sm_90 compile-only check skipped)
#   train     scripts/train.py --sampler hf, 2 steps, bf16, a tiny random-init model with the SmolLM2 tokenizer;
#             its metrics are copied to train_metrics.jsonl (60)
#   bench     benchmarks/bench_kernel.py, linear_opd at N 2048 and 16384, V 151936, H 4096: ours, the fixed-tile
#             kernels, eager, torch.compile and the chunked path, in % of measured copy bandwidth and matmul (110; rows print as they finish)
# At most 7 files land in OUT_DIR: summary.txt, pytest.log, kernels.log, tiny_model.log, train.log,
# train_metrics.jsonl, bench.log (the markdown table for benchmarks/RESULTS.md).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python3}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); this check needs one GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
: > "$OUT/summary.txt"
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=1
    echo "$name: rc=$rc ($(( $(date +%s) - start )) s)$([ $rc -eq 124 ] && echo ", timed out after $limit s")" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.log"
}

"$PY" - >> "$OUT/summary.txt" 2>&1 <<'EOF'
import platform, shutil, subprocess, torch, triton, transformers
smi = shutil.which("nvidia-smi")
driver = (subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if smi else "") or "?"
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name()} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), driver {driver}, "
      f"CUDA {torch.version.cuda}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, Python {platform.python_version()}, {torch.cuda.device_count()} GPU(s)")
EOF
cat "$OUT/summary.txt"

step pytest 200 "$PY" -m pytest -m gpu tests -v -rA -p no:cacheprovider
step kernels 90 "$PY" -m pytest tests/test_kernel_*.py -m triton -v -rA -p no:cacheprovider -k "not compile_for_sm90"

TINY="$OUT/tiny-model"
"$PY" - "$TINY" > "$OUT/tiny_model.log" 2>&1 <<'EOF'
import sys
sys.path.insert(0, "tests")
from conftest import SMOLLM2_ASSETS, save_tiny_llama
from opd_local.config import ModelConfig
from opd_local.models import load_tokenizer
save_tiny_llama(sys.argv[1], load_tokenizer(str(SMOLLM2_ASSETS), ModelConfig()), seed=1)
EOF
step train 60 "$PY" scripts/train.py --student "$TINY" --sampler hf --run.device cuda --model.dtype bfloat16 \
    --steps 2 --groups_per_step 2 --samples_per_group 2 --max_tokens 16 --max_train_rows 8 --max_heldout_rows 2 \
    --eval.every 0 --save_every 0 --lr 1e-3 --out_dir "$OUT/train-run"
cp "$OUT/train-run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
rm -rf "$TINY" "$OUT/train-run"
step bench 110 "$PY" benchmarks/bench_kernel.py --device cuda --ops linear_opd --n 2048 16384 --v 151936 --h 4096 \
    --warmup 25 --rep 100

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $status
