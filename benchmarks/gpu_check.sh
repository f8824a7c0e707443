#!/usr/bin/env bash
# One prepared check of every CUDA path, for the few minutes a GPU is lent (issue 18). On one GPU, in order:
#   1. the CUDA tests (pytest -m cuda: bf16 training + resume, memory modes, offload, evaluate, DDP on one GPU,
#      then training.compile with inductor)
#   2. benchmarks/train_step.py: FLUX.1-dev architecture, random bf16 weights, 512 and 1024 px, every memory mode
#   3. benchmarks/sample.py --full: FLUX.1-dev pipeline at 1024 px, identity vs base, memory with/without offload
# then benchmarks/gpu_record.py turns the JSON into the rows of benchmarks/README.md.
# Each part stops at its own time limit (a python-side limit that keeps finished rows, and a hard `timeout`
# behind it), so the whole run fits about 8 minutes on an H100; a part that fails does not stop the next.
# Nothing is downloaded: wheels in .whl/ next to the repository root (the GPU machine may have no registry) are
# unpacked into a temporary folder put on PYTHONPATH; the repository's src/ is used whether installed or not.
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]      (OUT_DIR default: $OUT, else ./gpu_check)
#   --dry-run   the same script on the CPU with the scaled-down configs (tiny train step, small sampler), in ~1 min
# Limits in seconds (environment): GPU_CHECK_TESTS_S (140), GPU_CHECK_TRAIN_S (250), GPU_CHECK_SAMPLE_S (90): the
# training rows (all 8 took 224 s on the H200) before sampling, whose 1024 px ratio two GPUs have measured already.
# GPU_CHECK_PARTS: the parts to run (default "cuda_tests train_step sample").
# GPU_CHECK_WHEELS: the wheel folder (default REPO/.whl; empty: none). Build it with benchmarks/gpu_wheels.py.
# Output (8 files, the device tool's limit): env.json, cuda_tests.xml, train_step.json, train_step_profile.txt
# (torch.profiler table of one step per row), sample.json, parts.json, rows.md, gpu_check.log.
set -uo pipefail

DRY_RUN=0
OUT_DIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) OUT_DIR="$arg" ;;
    esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_DIR:-${OUT:-gpu_check}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
rm -f "$OUT_DIR/train_step_profile.txt"  # appended per row: a rerun into the same folder starts it afresh
PY="${PYTHON:-python3}"
cd "$REPO" || exit 2

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

WHEELS="${GPU_CHECK_WHEELS-$REPO/.whl}"
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/dtback-gpu-site.XXXXXX")"
    for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE" || exit 2; done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "unpacked $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
fi
export PYTHONPATH="$REPO/src:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    TRAIN_ARGS=(--preset tiny --device cpu --warmup 1 --steps 1)
    SAMPLE_ARGS=(--device cpu --repeats 1 --steps 2 --size 64)
else
    DEVICE=cuda
    TRAIN_ARGS=(--preset full --device cuda --warmup 2 --steps 5)
    SAMPLE_ARGS=(--full --device cuda --repeats 3)
fi
TESTS_S="${GPU_CHECK_TESTS_S:-140}"
TRAIN_S="${GPU_CHECK_TRAIN_S:-250}"
SAMPLE_S="${GPU_CHECK_SAMPLE_S:-90}"

"$PY" - "$OUT_DIR/env.json" "$DRY_RUN" <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, importlib.metadata as md, json, platform, subprocess, sys
import torch
env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": sys.argv[2] == "1",
       "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "cpu_count": __import__("os").cpu_count()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(device=props.name, gpu_memory_gb=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True)
    env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
else:
    env["device"] = "CPU: " + (platform.processor() or platform.machine())
for name in ("diffusers", "transformers", "accelerate", "peft", "pydantic", "torchao", "bitsandbytes", "pytest"):
    try:
        env[name] = md.version(name)
    except md.PackageNotFoundError:
        env[name] = None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
EOF

PARTS=()
ONLY=" ${GPU_CHECK_PARTS:-cuda_tests train_step sample} "
part() {  # part NAME LIMIT_S COMMAND...: run with a hard limit (+20 s over the python-side one), record the exit;
    # the hard limit interrupts (SIGINT) first, so pytest still writes its report of the tests that finished
    local name="$1" limit="$2"; shift 2
    if [[ "$ONLY" != *" $name "* ]]; then log "part $name: not in GPU_CHECK_PARTS"; return; fi
    log "part $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --signal INT --kill-after 10 "$((limit + 20))" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "part $name: exit $rc after $((SECONDS - start)) s"
    PARTS+=("{\"part\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}")
}

part cuda_tests "$TESTS_S" "$PY" -m pytest -m cuda tests/cuda -p no:cacheprovider -q -rA \
    --junitxml "$OUT_DIR/cuda_tests.xml" -o "junit_family=xunit1"
# shellcheck disable=SC2086  # GPU_CHECK_TRAIN_EXTRA: extra arguments, split on spaces (e.g. "--sizes 512")
part train_step "$TRAIN_S" "$PY" benchmarks/train_step.py "${TRAIN_ARGS[@]}" ${GPU_CHECK_TRAIN_EXTRA:-} \
    --time-limit "$TRAIN_S" --json "$OUT_DIR/train_step.json" --profile "$OUT_DIR/train_step_profile.txt"
part sample "$SAMPLE_S" "$PY" benchmarks/sample.py "${SAMPLE_ARGS[@]}" --time-limit "$SAMPLE_S" \
    --json "$OUT_DIR/sample.json"

(IFS=,; echo "[${PARTS[*]:-}]") > "$OUT_DIR/parts.json"
"$PY" benchmarks/gpu_record.py "$OUT_DIR" > "$OUT_DIR/rows.md" 2>> "$LOG"
record_rc=$?
cat "$OUT_DIR/rows.md" | tee -a "$LOG"
log "done on $DEVICE: results in $OUT_DIR"
failed=$("$PY" -c "import json,sys; print(sum(p['exit'] != 0 for p in json.load(open(sys.argv[1]))))" \
    "$OUT_DIR/parts.json")
[ "$failed" = 0 ] && [ "$record_rc" = 0 ]
