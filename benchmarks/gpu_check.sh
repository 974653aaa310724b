#!/usr/bin/env bash
# Checks that need a GPU, one line each (see benchmarks/gpu_check.py); under 10 minutes on one H100-class GPU.
# Usage: benchmarks/gpu_check.sh [--only colocate,bf16,nccl,zero3,fsdp2]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec timeout 590 "$PYTHON" benchmarks/gpu_check.py "$@"
