#!/usr/bin/env bash
# Reproduce results/bench/. CPU figures always (the tiny model and the mid-size random model);
# on a CUDA machine also Qwen2.5-VL-7B (random weights from the bundled architecture, bf16) at
# ~1.3k and ~5k visual tokens, and its throughput at batch 1/4/8/16 with the largest batch in 40 GiB.
# Set MODEL to a checkpoint directory to measure real weights instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TAG=${TAG:-$(hostname -s)}
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -m ivcp bench --model "${MODEL:-qwen2_5_vl_7b}" --methods vanilla,fastv,pdrop,ivc_prune \
    --visual-tokens 1300,5000 --repeats 5 --warmup 2 --new-tokens 64 --out "results/bench/gpu-${MODEL:-qwen2_5_vl_7b}-$TAG"
  "$PY" -m ivcp bench --model "${MODEL:-qwen2_5_vl_7b}" --methods vanilla,ivc_prune,fastv \
    --visual-tokens 1300 --batch-sizes 1,4,8,16 --memory-budget-gb 40 --repeats 3 --warmup 1 --new-tokens 64 \
    --out "results/bench/gpu-${MODEL:-qwen2_5_vl_7b}-batch-$TAG"
else
  "$PY" -m ivcp bench --model tiny --methods vanilla,fastv,window_fastv,pdrop,vscan,adaptprune,random,ivc_prune \
    --image-sizes 448x336 --repeats 5 --out results/bench/cpu-tiny
  "$PY" -m ivcp bench --model qwen2_5_vl_mini --methods vanilla,fastv,pdrop,ivc_prune,random \
    --image-sizes 448x336,896x672 --keep-ratios 0.25,0.5,0.75 --repeats 3 --new-tokens 16 \
    --out results/bench/cpu-qwen2_5_vl_mini
  "$PY" -m ivcp bench --model qwen2_5_vl_mini --methods vanilla,fastv,pdrop,ivc_prune --image-sizes 448x336 \
    --batch-sizes 1,4,8,16 --repeats 3 --warmup 1 --new-tokens 16 --threads 2 --out results/bench/cpu-qwen2_5_vl_mini-batch
fi
