# Shared by the test_ivcp_*.sh scripts (sourced, not run): argument parsing, the interpreter, the
# model names, the launch (python or torchrun), the tables and the exit status.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
WORK=${IVCP_WORK_DIR:-$PWD/outputs}
NPROC_GIVEN=${NPROC:+yes}  # set by the user (NPROC or --nproc), never changed by a script's default
NPROC=${NPROC:-1}
PROMPTS=${PROMPTS:-authors}
EXTRA=()
STATUS=0  # the worst exit status so far: 1 when a run or a table cell failed

usage_error() {  # one line on stderr, exit 2
  echo "$(basename "$0"): $*" >&2
  exit 2
}

parse_args() {  # --models "A B" --methods a,b --data "X Y" --prompts P --nproc N --per-split N -- <run.py args>
  while [ $# -gt 0 ]; do
    case "$1" in
      --models|--methods|--data|--prompts|--nproc|--per-split)
        if [ $# -lt 2 ] || [ -z "$2" ] || [[ "$2" == --* ]]; then usage_error "$1 needs a value"; fi ;;
    esac
    case "$1" in
      --models) MODELS="$2"; shift 2 ;;
      --methods) METHODS="$2"; shift 2 ;;
      --data) DATA="$2"; shift 2 ;;
      --prompts) PROMPTS="$2"; shift 2 ;;
      --nproc) NPROC="$2"; NPROC_GIVEN=yes; shift 2 ;;
      --per-split) PER_SPLIT="$2"; shift 2 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) usage_error "unknown argument $1 (see the header of $0)" ;;
    esac
  done
  if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then usage_error "--nproc (or NPROC) must be a positive integer, got '$NPROC'"; fi
  if [ -n "${PER_SPLIT:-}" ] && ! [[ "$PER_SPLIT" =~ ^[1-9][0-9]*$ ]]; then
    usage_error "--per-split (or PER_SPLIT) must be a positive integer, got '$PER_SPLIT'"
  fi
}

model_names() {  # every model x every method under the prompt protocol, as VLMEvalKit model names
  "$PY" - "$MODELS" "$METHODS" "$PROMPTS" <<'PY'
import sys
from ivcp.eval.protocol import run_name
models, methods, protocol = sys.argv[1].split(), [m for m in sys.argv[2].split(",") if m], sys.argv[3]
try:
    print(" ".join(run_name(b, m, protocol) for b in models for m in methods))
except ValueError as error:
    sys.exit(f"error: {error}")
PY
}

paper_label() {  # the paper's name for a model ("" when the paper has no row for it): configs/eval.toml
  "$PY" -c "import sys; from ivcp.results import paper_model_label; print(paper_model_label(sys.argv[1]))" "$1"
}

launch() {  # VLMEvalKit's run with ivcp registered; torchrun when several processes are asked for
  local names rc=0
  echo "VLMEvalKit/run.py on $NPROC process(es)"
  names=$(model_names) || exit 2
  export IVCP_STATS_DIR=${IVCP_STATS_DIR:-$WORK/vlmeval/ivcp_stats}
  # shellcheck disable=SC2086
  if [ "$NPROC" -gt 1 ]; then
    # --standalone: a free port, so two runs on one machine never collide (29500 is the default)
    "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" "$HERE/run.py" --data $DATA --model $names \
      --work-dir "$WORK/vlmeval" "${EXTRA[@]}" || rc=$?
  else
    "$PY" "$HERE/run.py" --data $DATA --model $names --work-dir "$WORK/vlmeval" "${EXTRA[@]}" || rc=$?
  fi
  [ "$rc" -eq 2 ] && exit 2  # bad arguments: nothing ran
  [ "$rc" -ne 0 ] && STATUS=1
  return 0
}

tables() {  # kind, paper csv
  local kind=$1 paper=$2 base label rc
  for base in $MODELS; do
    label=$(paper_label "$base")
    args=(--work-dir "$WORK/vlmeval" --model "$base" --methods "$METHODS" --kind "$kind" --prompts "$PROMPTS"
          --benchmarks "$(echo $DATA | tr ' ' ',')" --out "$WORK/results" --lmudata "${LMUData:-}")
    if [ -n "$label" ]; then args+=(--paper "$ROOT/results/paper/$paper" --paper-model "$label"); fi
    rc=0
    "$PY" "$ROOT/scripts/collect_results.py" "${args[@]}" || rc=$?
    [ "$rc" -ne 0 ] && STATUS=1
  done
  return 0
}

finish() {  # the script's exit status, with a last word when something failed
  if [ "$STATUS" -ne 0 ]; then
    echo "FAILED: some model x benchmark runs did not produce results (see the lines marked FAILED / MISSING above)" >&2
  fi
  exit "$STATUS"
}
