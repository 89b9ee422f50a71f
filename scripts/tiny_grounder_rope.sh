#!/usr/bin/env bash
# Does the tiny grounder's rotary base matter — for accuracy, and for what dropping the IVC tokens costs?
# Three grounders with the same budget (2,000 steps, the same schedule and data), differing only in the
# decoder's rotary: θ = 10 (head_dim 32, the shipped model's), θ = 1e4 (head_dim 32) and θ = 1e6
# (head_dim 64: with head_dim 32 the width stream barely turns at 1e6). Each is scored unpruned, with
# drop_ivc, IVC-Prune and IVC-Prune without its IVC tokens (K = 2, keep 0.5) on 500 held-out pictures.
#
#   bash scripts/tiny_grounder_rope.sh [RUNS_DIR] [OUT_DIR]     (defaults: outputs/rope-runs, results/tiny-grounder/rope)
#
# About 40 min of training per variant on 2 CPU cores; reruns resume and skip what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${1:-outputs/rope-runs}
OUT=${2:-results/tiny-grounder/rope}
THREADS=${THREADS:-0}
declare -A VARIANTS=([theta10_hd32]='{}' [theta1e4_hd32]='{"rope_theta": 10000}' [theta1e6_hd64]='{"rope_theta": 1000000, "head_dim": 64}')
for name in theta10_hd32 theta1e4_hd32 theta1e6_hd64; do
  "$PY" scripts/train_tiny_grounder.py --out "$RUNS/$name" --steps 2000 --eval-every 500 --threads "$THREADS" \
      --config-overrides "${VARIANTS[$name]}"
  "$PY" scripts/train_tiny_grounder.py --out "$RUNS/$name" --export "$RUNS/$name/export" > /dev/null
  "$PY" scripts/tiny_grounder_results.py --checkpoint "$RUNS/$name/export" --methods vanilla,drop_ivc,ivc_prune,ivc_prune_no_ivc \
      --keep-ratios 0.5 --layers 2 --threads "$THREADS" --out "$OUT/$name"
done
