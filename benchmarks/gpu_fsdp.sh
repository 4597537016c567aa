#!/usr/bin/env bash
# FSDP on one GPU, in one process: gptcore's whole loop (train.parallel=fsdp; train() starts a one-rank NCCL group,
# no torchrun, no Ray) training gpt2-large, then gpt2-xl, 30 steps each at batch 8 x 1024 on random tokens, with
# activation checkpointing, bf16 parameters / fp32 reductions, torch.compile of each block and the vocabulary padded
# to 50304 (benchmarks/bench_gpu_fsdp.py). Prints tokens/s, MFU (gptcore.hardware) and peak GPU memory of each.
# Fits an 80 GB H100 (gpt2-xl: 25 GB of fp32 weights, gradients and AdamW state, a few GB of activations).
# No internet and no corpus needed; wheels in a git-ignored wheels/ or .whl/ are installed first (gpu_common.sh).
# Each step runs under its own `timeout` and logs to $OUT/NAME.txt (default ./gpu-logs): one failure does not hide
# the others. FSDP compiles each block (head and loss eager), DDP the whole model (loss fused): xl_eager and
# xl_ddp_eager compare them at the same (no) compile scope. The default steps take under 6 minutes in all:
#   bash benchmarks/gpu_fsdp.sh                  # versions large xl
#   bash benchmarks/gpu_fsdp.sh xl_ddp xl_noac  # more: the DDP reference, no activation checkpointing (see STEPS)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
source benchmarks/gpu_common.sh
install_wheels || exit 2
B=benchmarks/bench_gpu_fsdp.py
VERSIONS='import sys, torch, torch.distributed as dist
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-")
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA",
      "| bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "| nccl backend", dist.is_nccl_available())
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy  # FSDP2
import gptcore.parallel, gptcore.train
from gptcore.hardware import peak_flops
print("FSDP2 and gptcore import; datasheet peak", peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None)'
declare -A STEPS=(
    [versions]="20"
    [large]="140 python3 $B --parallel fsdp --preset gpt2-large --batch 8 --steps 30"
    [xl]="185 python3 $B --parallel fsdp --preset gpt2-xl --batch 8 --steps 30"
    [xl_ddp]="185 python3 $B --preset gpt2-xl --batch 8 --steps 30 --parallel ddp"
    [xl_ddp_noac]="185 python3 $B --preset gpt2-xl --batch 8 --steps 30 --parallel ddp --no-ac"
    [xl_eager]="120 python3 $B --parallel fsdp --preset gpt2-xl --batch 8 --steps 20 --skip 4 --no-compile"
    [xl_ddp_eager]="120 python3 $B --parallel ddp --preset gpt2-xl --batch 8 --steps 20 --skip 4 --no-compile"
    [xl_noac]="185 python3 $B --parallel fsdp --preset gpt2-xl --batch 8 --steps 30 --no-ac"
    [xl_offload]="200 python3 $B --parallel fsdp --preset gpt2-xl --batch 8 --steps 12 --skip 4 --no-compile --cpu-offload"
)
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv 2>&1 | head -3
for name in ${@:-versions large xl}; do
    [[ -n "${STEPS[$name]:-}" ]] || { echo "unknown step $name (known: ${!STEPS[*]})"; continue; }
    if [[ $name == versions ]]; then
        step versions "${STEPS[versions]}" python3 -c "$VERSIONS"
    else
        # shellcheck disable=SC2086
        step "$name" ${STEPS[$name]}
    fi
done
