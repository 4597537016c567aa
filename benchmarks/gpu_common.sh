# Shared by the GPU scripts (gpu_acceptance.sh, gpu_session.sh, gpu_fsdp.sh); sourced, not run.
# A lent GPU machine has no internet and its own torch: what else the scripts need travels as wheels in a git-ignored
# folder (wheels/, or .whl/ as before) and is installed offline; logs go to $OUT (default ./gpu-logs).

OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# install_wheels [PACKAGE...]: install the wheels of wheels/ and .whl/ offline, into /tmp/site (no dependencies: the
# folder holds them), and put it and the checkout on PYTHONPATH. Nothing to do when neither folder has a wheel.
install_wheels() {
    local found=()
    for dir in wheels .whl; do
        compgen -G "$dir/*.whl" >/dev/null && found+=("$dir"/*.whl)
    done
    if ((${#found[@]})); then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${found[@]}" || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
}

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to $OUT/NAME.txt; print the exit status and
# its result lines. With DEADLINE set (seconds since the script started, bash's $SECONDS), the limit is cut to what
# is left of it, and a step with under 20 s left is skipped: the script as a whole keeps its time.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${DEADLINE:-} ]]; then
        local left=$((DEADLINE - SECONDS))
        ((left < 20)) && { echo "== $name: SKIPPED (${left} s left of the ${DEADLINE} s budget)"; return 124; }
        ((limit > left)) && limit=$left
    fi
    echo "== $name (limit ${limit} s): ${*%%$'\n'*}"
    local t0=$SECONDS rc
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo " (timed out)")"
    grep -E "BENCH_RESULT|BENCH_SUMMARY|^PASS|^FAIL|^\| |tokens/s|final|best val|device=|^set up|^note|Error|error:" "$OUT/$name.txt" | tail -12
    return $rc
}
