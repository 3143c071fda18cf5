#!/usr/bin/env bash
# One GPU check, one JSON: the verifier engine's pass cost by rows and `specedge bench
# --quick` on a CUDA device, in under 8 minutes, for comparing with the CPU figures and
# the simulator's roofline (python -m sims paper).
#
#   bench/gpu_check.sh                         # cuda, demo pair if present, else tiny
#   bench/gpu_check.sh --out gpu.json --models demo
#   bench/gpu_check.sh --device cpu --tiny --skip-bench   # the CPU path, as the tests run it
#   bench/gpu_check.sh --dry-run               # print what would run, run nothing
#
# Setup: it uses $PYTHON, else .venv/bin/python, else python3 - the first whose torch sees
# the device (a CUDA check needs a CUDA build of torch; this repo's .venv holds the CPU
# one). If that python cannot import the project it installs it editable without
# dependencies (works offline). The bench also needs the network stack (libp2p, trio,
# ...): when missing it installs them from ./.whl if that folder exists (wheels carried to
# a machine without internet), else from the package index; if that fails the bench step is
# recorded as skipped and the pass-cost curve still runs. The demo pair needs its weights
# prepared (`make demo` on a machine with internet); without them --models auto uses the
# tiny pair and says so in the JSON.
set -u -o pipefail

DEVICE=cuda
MODELS=auto
OUT=gpu_check.json
DRY=0
SKIP_BENCH=0
BUDGET_PASS=150
BUDGET_BENCH=300
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift ;;
    --models) MODELS="$2"; shift ;;
    --tiny) MODELS=tiny ;;
    --out) OUT="$2"; shift ;;
    --dry-run) DRY=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$MODELS" in auto|demo|tiny) ;; *) echo "error: --models is auto, demo or tiny" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$WORK/steps.tsv"
note() { printf '%s\n' "$*" >>"$WORK/notes.txt"; echo "gpu_check: $*" >&2; }

# step NAME LIMIT_S CMD...: run (or print) a command with a time limit, record rc and time.
step() {
  local name=$1 limit=$2; shift 2
  if [ "$DRY" = 1 ]; then echo "$name: timeout $limit $*"; return 0; fi
  local t0=$SECONDS rc
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
  tail -n 40 "$WORK/$name.log" >&2
  return $rc
}

pick_python() {
  local want=$1 py
  for py in ${PYTHON:-} .venv/bin/python python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    if [ "$want" = cpu ]; then
      "$py" -c 'import torch' 2>/dev/null && { echo "$py"; return 0; }
    else
      "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
        2>/dev/null && { echo "$py"; return 0; }
    fi
  done
  return 1
}

if ! PY=$(pick_python "${DEVICE%%:*}"); then
  if [ "$DRY" = 0 ]; then
    echo "error: no python here has a torch that sees '$DEVICE' (tried \$PYTHON, .venv, python3)" >&2
    exit 2
  fi
  PY=${PYTHON:-python3}
fi
note "python: $PY"

if [ "$DRY" = 0 ] && ! "$PY" -c 'import specedge.verifier.engine' 2>/dev/null; then
  note "installing the project (editable, no dependencies)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 \
    || { cat "$WORK/install.log" >&2; echo "error: cannot install the project" >&2; exit 2; }
fi

BENCH_MODULES='import libp2p, trio, hypercorn, starlette, httpx, sqlalchemy, simpy, bench.run'
bench_ready() { "$PY" -c "$BENCH_MODULES" 2>/dev/null; }
if [ "$DRY" = 0 ] && [ "$SKIP_BENCH" = 0 ] && ! bench_ready; then
  if [ -d .whl ]; then
    note "installing the bench's dependencies from ./.whl"
    timeout 120 "$PY" -m pip install -q --no-index --find-links .whl -e . >"$WORK/deps.log" 2>&1
  else  # bounded: libp2p pulls ~70 packages and compiles fastecdsa (needs libgmp-dev)
    note "installing the bench's dependencies from the package index"
    timeout 180 "$PY" -m pip install -q --timeout 20 --retries 1 -e . >"$WORK/deps.log" 2>&1
  fi
  bench_ready || { SKIP_BENCH=1; note "bench skipped: the network stack is not installable here (no internet and no ./.whl)"; }
fi

if [ "$MODELS" = auto ]; then
  MODELS=tiny
  if [ "$DRY" = 1 ] || "$PY" -c 'import sys; from specedge.weights import is_prepared as p
sys.exit(0 if p("qwen2.5-coder-1.5b") and p("qwen2.5-coder-0.5b") else 1)' 2>/dev/null; then
    MODELS=demo
  else
    note "demo pair not prepared here (make demo needs internet): using the tiny pair"
  fi
fi
if [ "$MODELS" = demo ]; then
  TARGET=qwen2.5-coder-1.5b; DRAFT=qwen2.5-coder-0.5b; DTYPE=bfloat16
  ROWS=1,2,4,8,16,32,64,128,256,512,1024; REPEATS=5; CONTEXT=128
else
  TARGET=tiny-test; DRAFT=tiny-test-draft
  DTYPE=$([ "${DEVICE%%:*}" = cpu ] && echo float32 || echo bfloat16)
  ROWS=$([ "${DEVICE%%:*}" = cpu ] && echo 1,5,10 || echo 1,2,4,8,16,32,64,128,256,512,1024)
  REPEATS=$([ "${DEVICE%%:*}" = cpu ] && echo 1 || echo 5)
  CONTEXT=$([ "${DEVICE%%:*}" = cpu ] && echo 16 || echo 128)
fi
note "models: $TARGET / $DRAFT ($DTYPE) on $DEVICE"

if [ "$DRY" = 0 ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
      2>/dev/null || echo "no nvidia-smi"; } >"$WORK/nvidia-smi.txt"
fi

step pass_cost "$BUDGET_PASS" "$PY" -m bench.pass_cost --device "$DEVICE" --model "$TARGET" \
  --dtype "$DTYPE" --rows "$ROWS" --repeats "$REPEATS" --context "$CONTEXT" \
  --max-seconds $((BUDGET_PASS - 30)) \
  --json "$WORK/pass_cost.json"
LEFT=$((470 - SECONDS))  # the whole check in under 8 minutes, setup included
[ "$LEFT" -lt "$BUDGET_BENCH" ] && BUDGET_BENCH=$LEFT
if [ "$SKIP_BENCH" = 0 ] && [ "$BUDGET_BENCH" -lt 90 ]; then
  SKIP_BENCH=1; note "bench skipped: only ${BUDGET_BENCH} s left of the 8 minutes"
fi
if [ "$SKIP_BENCH" = 0 ]; then
  step bench "$BUDGET_BENCH" "$PY" -m specedge.cli bench --quick --device "$DEVICE" \
    --target-model "$TARGET" --draft-model "$DRAFT" --dtype "$DTYPE" --max-new-tokens 48 \
    --timeout $((BUDGET_BENCH / 2)) --json "$WORK/bench.json"
fi
[ "$DRY" = 1 ] && exit 0

"$PY" - "$WORK" "$OUT" "$DEVICE" "$TARGET" "$DRAFT" "$DTYPE" <<'EOF'
import json, sys, time
from pathlib import Path
work, out, device, target, draft, dtype = sys.argv[1:]
w = Path(work)

def load(name):
    p = w / name
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None

steps = []
for line in (w / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    log = (w / f"{name}.log").read_text(errors="replace").splitlines()[-30:]
    steps.append({"name": name, "rc": int(rc), "seconds": int(secs),
                  "timed_out": rc in ("124", "137"), "log_tail": log})
notes = (w / "notes.txt").read_text().splitlines() if (w / "notes.txt").exists() else []
doc = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device,
       "nvidia_smi": (w / "nvidia-smi.txt").read_text().strip()
       if (w / "nvidia-smi.txt").exists() else None,
       "models": {"target": target, "draft": draft, "dtype": dtype}, "notes": notes,
       "steps": steps, "pass_cost": load("pass_cost.json"), "bench": load("bench.json")}
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(doc, indent=1) + "\n")
print("wrote", out)
sys.exit(1 if any(s["rc"] for s in steps) else 0)
EOF
