#!/usr/bin/env bash
# One-GPU benchmark of twinlm (H100 / H200 / A100), under 8 minutes in all:
#   bash benchmarks/gpu.sh            # from the repository root
# gpt2-small (seq 1024) and bert-base (seq 512) in bf16: tokens/s, MFU, peak memory, SDPA vs flash-attention
# (if installed), torch.compile off/on; DeepSpeed ZeRO-2 on one GPU; twinlm vs GPT2LMHeadModel and vs
# BertForMaskedLM at full size. Prints one table; writes benchmarks/results/gpu.{md,json}.
# It uses .venv if that has a CUDA torch, else the system python (torch must be there); twinlm is
# installed into it with `pip install -e .` when missing (--no-deps if the machine is offline).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: nvidia-smi not found: this script needs an NVIDIA GPU (on a CPU: python benchmarks/gpu_bench.py --cpu-toy)" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=""
for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda_torch "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu.sh: no python with a CUDA build of torch (tried .venv/bin/python, python3, python); install one first" >&2
    exit 1
fi
echo "python: $(command -v "$PY") ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"

if ! "$PY" -c 'import twinlm, transformers, accelerate' >/dev/null 2>&1; then
    echo "installing twinlm into $PY ..."
    "$PY" -m pip install -q -e . || "$PY" -m pip install -q --no-deps -e .
fi
"$PY" -c 'import deepspeed' >/dev/null 2>&1 || echo "note: deepspeed is not installed: the ZeRO-2 row will record the error"
"$PY" -c 'import flash_attn' >/dev/null 2>&1 || echo "note: flash_attn is not installed: SDPA only"

# Leave time for installation and start-up inside the 8 minutes: sections start only within the budget.
SPENT=$(( $(date +%s) - START ))
BUDGET=$(( 380 - SPENT ))
LIMIT=$(( 470 - SPENT ))
if [ "$BUDGET" -lt 60 ]; then echo "gpu.sh: set-up took ${SPENT} s: no time left for the benchmark" >&2; exit 1; fi
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
timeout "$LIMIT" "$PY" benchmarks/gpu_bench.py --budget-s "$BUDGET" "$@"
echo "gpu.sh: done in $(( $(date +%s) - START )) s"
