# Shared by the test_ivcp_*.sh scripts (sourced, not run): argument parsing, the interpreter, the
# model names, the launch (python or torchrun) and the tables.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
WORK=${IVCP_WORK_DIR:-$PWD/outputs}
NPROC=${NPROC:-1}
EXTRA=()

parse_args() {  # --models "A B" --methods a,b --data "X Y" --nproc N --per-split N -- <more run.py args>
  while [ $# -gt 0 ]; do
    case "$1" in
      --models) MODELS="$2"; shift 2 ;;
      --methods) METHODS="$2"; shift 2 ;;
      --data) DATA="$2"; shift 2 ;;
      --nproc) NPROC="$2"; shift 2 ;;
      --per-split) PER_SPLIT="$2"; shift 2 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
  done
}

model_names() {  # every base model x every method, as VLMEvalKit model names
  "$PY" -c "import sys; from ivcp.results import model_name; print(' '.join(model_name(b, m) for b in sys.argv[1].split() for m in sys.argv[2].split(',') if m))" "$MODELS" "$METHODS"
}

paper_label() {  # the paper's name for a base model ("" when the paper has no row for it): configs/eval.toml
  "$PY" -c "import sys; from ivcp.results import paper_model_label; print(paper_model_label(sys.argv[1]))" "$1"
}

launch() {  # VLMEvalKit's run with ivcp registered; torchrun when several processes are asked for
  export IVCP_STATS_DIR=${IVCP_STATS_DIR:-$WORK/ivcp_stats}
  local names
  names=$(model_names)
  # shellcheck disable=SC2086
  if [ "$NPROC" -gt 1 ]; then
    "$PY" -m torch.distributed.run --nproc-per-node="$NPROC" "$HERE/run.py" --data $DATA --model $names \
      --work-dir "$WORK/vlmeval" "${EXTRA[@]}"
  else
    "$PY" "$HERE/run.py" --data $DATA --model $names --work-dir "$WORK/vlmeval" "${EXTRA[@]}"
  fi
}

tables() {  # kind, paper csv
  local kind=$1 paper=$2 base label
  for base in $MODELS; do
    label=$(paper_label "$base")
    args=(--work-dir "$WORK/vlmeval" --model "$base" --methods "$METHODS" --kind "$kind"
          --benchmarks "$(echo $DATA | tr ' ' ',')" --out "$WORK/results")
    if [ -n "$label" ]; then args+=(--paper "$ROOT/results/paper/$paper" --paper-model "$label"); fi
    "$PY" "$ROOT/scripts/collect_results.py" "${args[@]}"
  done
}
