#!/usr/bin/env bash
# Proves the CUDA paths on one GPU in under 8 minutes, offline, installing nothing into the environment.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]     (default gpu_check_out/; PYTHON=... picks the interpreter)
#
# Needs torch, triton, transformers, peft, accelerate, safetensors, pyyaml, pytest; not vllm, flash-attn or
# datasets. Every step writes its log under OUT_DIR and a line to OUT_DIR/summary.txt; the exit status is
# non-zero when any step failed. Steps (time limits in seconds):
#   env       one line in summary.txt: GPU, driver, torch / triton / transformers versions
#   pytest    pytest -m gpu: compiled kernels vs float64 (offsets past 2^31, the vocab tail), packed attention,
#             a bf16 training step with the HF sampler, FSDP2 on one GPU, parity with a bf16 engine, and the
#             world-size-1 NCCL scenario (200; -v, so a timeout still shows which tests passed); all but the
#             Qwen 3.5 test, which the fla step runs
#   kernels   tests/test_kernel_*.py -m triton, compiled: every Triton op vs float64 (90; its sm_90 compile-only check skipped)
#   train     scripts/train.py --sampler hf, 2 steps, bf16, a tiny random-init model with the SmolLM2 tokenizer;
#             its metrics are copied to train_metrics.jsonl (60)
#   bench     benchmarks/bench_kernel.py, linear_opd at N 2048 and 16384, V 151936, H 4096: ours, the fixed-tile
#             kernels, eager, torch.compile and the chunked path, in % of measured copy bandwidth and matmul (110; rows print as they finish)
#   fla       tests/test_gpu.py::test_qwen3_5_gated_deltanet_packs_exactly_on_cuda -v -s: tiny Qwen 3.5 (Gated DeltaNet)
#             packed rows equal each sequence alone, and the packing check keeps both layouts, in fp32 and bf16;
#             through flash-linear-attention's Triton kernels when a wheel directory is there (below), else through
#             transformers' torch fallback; summary.txt says which ran (what is left of the 8 minutes, at most 180;
#             not run, and counted as failed, when under 30 s are left: with fla, Triton autotunes some 50
#             kernel configurations per dtype, fp32 and bf16, each compiled on first use)
# At most 8 files land in OUT_DIR: summary.txt, pytest.log, kernels.log, tiny_model.log, train.log,
# train_metrics.jsonl, bench.log (the markdown table for benchmarks/RESULTS.md), fla.log.
#
# flash-linear-attention (`fla`) comes from a directory of wheels: $GPU_CHECK_WHEELS, else gpu_check_wheels/ in the
# repository root when it exists (git ignores it: whatever copies the working tree to the GPU machine must be told
# to take it). The step installs them with pip --no-index --no-deps into a scratch directory that only its own
# PYTHONPATH names (unpacking them itself where the interpreter has no pip), einops only where it is missing. Fill
# it on a machine with PyPI (three wheels, about 1.5 MB):
#   pip download --no-deps -d gpu_check_wheels fla-core==0.6.0 flash-linear-attention==0.6.0 einops==0.8.2
# 0.6.0, the newest: all three are pure Python (py3-none-any). fla-core (the kernels, package `fla`) needs einops,
# and torch>=2.7 and triton>=3.3 for CUDA; flash-linear-attention (its layers and models) needs fla-core==0.6.0 and
# transformers>=5.6.2,<6. It knows Hopper's Triton 3.4-3.7.0 miscompile (fla issue #640): the gated delta rule's
# backward raises there rather than return wrong gradients; the forwards this step runs are unaffected.
# causal-conv1d has no wheel on PyPI (sources to compile), so the short convolution stays on transformers' torch code.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python3}
START=$(date +%s)
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

QWEN35_TEST=tests/test_gpu.py::test_qwen3_5_gated_deltanet_packs_exactly_on_cuda
step pytest 200 "$PY" -m pytest -m gpu tests -v -rA -p no:cacheprovider --deselect "$QWEN35_TEST"
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

# The fla step: flash-linear-attention from the wheel directory when there, then the Qwen 3.5 test on whichever
# Gated DeltaNet code transformers picks (fla's Triton kernels, else its torch fallback).
WHEELS=${GPU_CHECK_WHEELS:-gpu_check_wheels}
if [ -n "${GPU_CHECK_WHEELS:-}" ] || [ -d "$WHEELS" ]; then
    fla_note="flash-linear-attention from wheels in $WHEELS"
else
    WHEELS=""
    fla_note="no wheels (GPU_CHECK_WHEELS unset, no gpu_check_wheels/): Gated DeltaNet on transformers' torch fallback"
fi
FLA_SITE=$(mktemp -d)
export PY WHEELS FLA_SITE QWEN35_TEST
fla_check() {
    if [ -n "$WHEELS" ]; then
        local names="fla-core flash-linear-attention" patterns="fla_core-*.whl flash_linear_attention-*.whl"
        "$PY" -c "import einops" 2>/dev/null || { names="$names einops"; patterns="$patterns einops-*.whl"; }
        if [ ! -d "$WHEELS" ] || ! ls "$WHEELS"/fla_core-*.whl >/dev/null 2>&1; then
            echo "fla: no fla_core wheel in $WHEELS"
            return 1
        fi
        echo "== installing $names from $WHEELS into $FLA_SITE"
        if "$PY" -m pip --version >/dev/null 2>&1; then
            # shellcheck disable=SC2086
            "$PY" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps \
                --target "$FLA_SITE" $names || return 1
        else  # no pip: a pure-Python wheel is a zip of the files to import, unpacked as is
            # shellcheck disable=SC2086
            "$PY" - "$WHEELS" "$FLA_SITE" $patterns <<'PYEOF' || return 1
import glob, os, sys, zipfile
for pattern in sys.argv[3:]:
    wheels = sorted(glob.glob(os.path.join(sys.argv[1], pattern)))
    if not wheels:
        sys.exit(f"no {pattern} in {sys.argv[1]}")
    print("unpacking", wheels[-1])
    zipfile.ZipFile(wheels[-1]).extractall(sys.argv[2])
PYEOF
        fi
        export PYTHONPATH="$FLA_SITE:$PYTHONPATH"
    fi
    "$PY" -m pytest "$QWEN35_TEST" -v -s -rA -p no:cacheprovider
}
export -f fla_check
fla_limit=$(( START + 470 - $(date +%s) ))
[ $fla_limit -gt 180 ] && fla_limit=180
echo "fla: $fla_note" | tee -a "$OUT/summary.txt"
if [ $fla_limit -ge 30 ]; then
    step fla "$fla_limit" bash -c fla_check
    grep -m 1 -o "Gated DeltaNet implementation.*" "$OUT/fla.log" | sed 's/^/fla: /' | tee -a "$OUT/summary.txt"
else
    status=1
    echo "fla: not run, $(( fla_limit > 0 ? fla_limit : 0 )) s of the 8 minutes left" | tee -a "$OUT/summary.txt" \
        "$OUT/fla.log"
fi
rm -rf "$FLA_SITE"

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $status
