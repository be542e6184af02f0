#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, one script that names the machine, runs the CUDA tests and the
# two speed benchmarks on the GPU. Sized for a short lease: about 4 minutes expected on an H200, and every stage
# is capped (`timeout`) so that the whole run stays under 7 minutes; a stage that fails or runs out of time is
# reported and the next one still runs.
#
#   benchmarks/gpu_check.sh                  # on the GPU machine, from anywhere in the checkout
#   benchmarks/gpu_check.sh --fetch-wheels   # beforehand, on a machine with network access: fill .whl/
#
# Everything goes to $OUT if set, else to benchmarks/results/gpu/ (at most 5 files): gpu_check.log (all output:
# nvidia-smi, versions, the tests, the benchmarks), summary.md (the machine, each stage's exit status and time),
# speed_hanq_cuda.md, speed_population_cuda.{md,json}. Sizes: GPU_CHECK_HANQ_STEPS (1000), GPU_CHECK_MEMBERS
# ("30 300"), GPU_CHECK_SECONDS (2).
#
# Where the CUDA build of torch comes from. The Makefile's venv target (`make .venv/.installed-<cksum>`, the one
# `make test` uses) installs torch==2.13.0 and the package's extras from the package index: on Linux x86-64 the
# default index's torch is a CUDA build, but it needs a network, and this workplace's GPU machine has none
# (/work/.library/device/README.md: "nothing outside it can be reached"); its CUDA wheels (> 2 GB with the
# nvidia-* libraries) are also far over the 64 MiB that can be carried there. That machine's `python3` already
# holds a CUDA torch (2.11.0+cu130 when last seen) with numpy, pytest, pandas and matplotlib, but not
# stable-baselines3, sb3-contrib or gymnasium. So, in this order:
#   1. the Python in $GPU_CHECK_PYTHON, else `python3`, if its torch sees a CUDA device; the project's own pins
#      (torch>=2.13) do not apply there: the checkout goes on PYTHONPATH instead of being pip-installed, so pip
#      never swaps that torch for another, and the log records which torch the results are for;
#   2. the pure-Python packages it lacks from .whl/ (`--fetch-wheels` puts them there, 0.8 MB; carry it to the
#      GPU machine, e.g. the device tool's `run(command="benchmarks/gpu_check.sh", carry=[".whl"],
#      timeout_s=450)`), installed with `pip --no-index --no-deps --target`, or from the index where there is one;
#   3. only if that Python has no CUDA torch: .venv from the Makefile's target (network needed; torch 2.13.0
#      from the default index, the CUDA build on Linux), used if its torch sees the GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."

# The versions CI tests with (pure-Python wheels, any platform).
WHEELS="stable-baselines3==2.9.2 sb3-contrib==2.9.2 gymnasium==1.4.0 farama-notifications==0.0.6"
IMPORTS="stable_baselines3 sb3_contrib gymnasium"

if [ "${1:-}" = "--fetch-wheels" ]; then
    py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    # shellcheck disable=SC2086
    exec "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d .whl $WHEELS
fi

RESULTS=${OUT:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check.log
SUMMARY=$RESULTS/summary.md
SITE=/tmp/gpu_check_site
FAILED=0
export PYTHONUNBUFFERED=1

has_cuda() {  # has_cuda PYTHON: its torch imports and sees a CUDA device
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND capped at SECONDS; log and summarise its status and time
    local name=$1 cap=$2 start=$SECONDS rc=0
    shift 2
    echo
    echo "=== $name (at most ${cap} s): $*"
    timeout --kill-after=10 "$cap" "$@" || rc=$?
    local note=""
    [ "$rc" = 124 ] && note=" (timed out)"
    echo "=== $name: exit $rc$note after $((SECONDS - start)) s"
    echo "| $name | $rc$note | $((SECONDS - start)) |" >>"$SUMMARY"
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

main() {
    local host
    host=$(hostname 2>/dev/null || cat /proc/sys/kernel/hostname)
    echo "=== gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $host, commit $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
    uname -a
    echo "CPU cores: $(nproc)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found"
    fi

    local py=${GPU_CHECK_PYTHON:-python3}
    if ! has_cuda "$py"; then
        echo "=== $py: no torch that sees a CUDA device"
        if ! { [ -x .venv/bin/python ] && has_cuda .venv/bin/python; }; then
            # only where the index answers: without a network the Makefile's pip would retry for minutes
            if timeout 30 python3 -m pip download -q --no-deps --retries 0 --timeout 10 -d /tmp/gpu_check_probe \
                farama-notifications==0.0.6 >/dev/null 2>&1; then
                echo "=== the Makefile's venv target (torch 2.13.0 from the default index: the CUDA build on Linux)"
                make ".venv/.installed-$(cksum <pyproject.toml | cut -d' ' -f1)" || true
            else
                echo "=== no package index reachable: no .venv can be made here"
            fi
        fi
        py=.venv/bin/python
        if ! has_cuda "$py"; then
            echo "=== no Python here has a CUDA torch: nothing to check on a GPU"
            return 2
        fi
    fi
    if ! "$py" -c "import $(echo "$IMPORTS" | tr ' ' ',')" 2>/dev/null; then
        mkdir -p "$SITE"
        if ls .whl/*.whl >/dev/null 2>&1; then
            echo "=== installing .whl/ into $SITE"
            "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$SITE" .whl/*.whl
        else
            echo "=== no .whl/: installing $WHEELS from the index into $SITE"
            # shellcheck disable=SC2086
            "$py" -m pip install -q --disable-pip-version-check --no-deps --retries 0 --timeout 10 --target "$SITE" \
                $WHEELS
        fi
    fi
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$py" -c "import sb3_hanq"; then
        echo "=== sb3_hanq does not import with $py: see above (wheels missing? run --fetch-wheels and carry .whl)"
        return 3
    fi
    local machine
    machine=$("$py" - <<'EOF'
import platform, torch, stable_baselines3, sb3_contrib, gymnasium, numpy
p = torch.cuda.get_device_properties(0)
print(f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, compute capability "
      f"{p.major}.{p.minor}); torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}; Python {platform.python_version()}, numpy {numpy.__version__}, "
      f"stable-baselines3 {stable_baselines3.__version__}, sb3-contrib {sb3_contrib.__version__}, "
      f"gymnasium {gymnasium.__version__}; float32 matmul precision {torch.get_float32_matmul_precision()}")
EOF
    )
    echo "=== machine: $machine"
    {
        echo "# GPU check"
        echo
        echo "Machine: $host, $(nproc) CPU cores; $machine."
        echo
        echo "| stage | exit status | seconds |"
        echo "|---|---|---|"
    } >"$SUMMARY"

    # 1. the CUDA tests: tests/test_cuda.py and the CUDA tests of the other files
    stage "CUDA tests" 90 "$py" -m pytest -q -p no:cacheprovider -rs -k cuda \
        tests/test_cuda.py tests/test_ntk.py tests/test_population_envs.py
    # 2. speed: HANQ / SSAQ / DQN gradient steps (about 45 s at these sizes)
    stage "speed_hanq --device cuda" 75 "$py" benchmarks/speed_hanq.py --device cuda \
        --steps "${GPU_CHECK_HANQ_STEPS:-1000}" --repeats 2 --out "$RESULTS/speed_hanq_cuda.md"
    # 3. speed: the population trainer, eager and compiled (about 2 minutes: each M builds its members twice and
    #    compiles once; M = 30 also gives the paper's protocol's time and the profiles)
    # shellcheck disable=SC2086
    stage "speed_population --device cuda" 210 "$py" benchmarks/speed_population.py --device cuda \
        --members ${GPU_CHECK_MEMBERS:-30 300} --seconds "${GPU_CHECK_SECONDS:-2}"
    # (speed_population.py writes into benchmarks/results/)
    cp benchmarks/results/speed_population_cuda.md benchmarks/results/speed_population_cuda.json "$RESULTS/" || true
    echo
    echo "=== done in $SECONDS s, $FAILED stage(s) failed; files in $RESULTS:"
    ls -l "$RESULTS"
    cat "$SUMMARY"
    [ "$FAILED" = 0 ]
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
