#!/usr/bin/env bash
# Grounding (RefCOCO / RefCOCO+ / RefCOCOg, Acc@0.5) of Qwen-VL models pruned by ivcp, through the
# pip-installed VLMEvalKit. Real run, e.g. on 8 GPUs:
#
#   export LMUData=/data/LMUData        # RefCOCO_testA.tsv ... RefCOCOg_val.tsv (ivcp's, upstream's or the
#                                       # authors' layout), or upstream's aggregated RefCOCO.tsv
#   export IVCP_MODEL_ROOT=/models      # folders named like Qwen2.5-VL-7B-Instruct (else hub ids; HF_HUB_OFFLINE is honoured)
#   bash VLMEvalKit/test_ivcp_qwen_grounding.sh --models "Qwen2.5-VL-7B-Instruct" \
#        --methods vanilla,fastv,window_fastv,pdrop,vscan,ivc_prune --nproc 8 [--prompts authors|dataset]
#
# Outputs go to $IVCP_WORK_DIR (default ./outputs): vlmeval/ (VLMEvalKit's, with ivcp_stats/), results/.
# The embedded default: with no LMUData set, synthetic TSVs are generated (outputs/lmudata) and the
# trained tiny grounder (Qwen2.5-VL-TinyGrounder, shipped with ivcp) runs vanilla, FastV, PDrop, VScan
# and IVC-Prune end to end on a CPU; the tables are printed. Exit status 1 when any run failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODELS=""; METHODS=""
DATA="RefCOCO_testA RefCOCO_testB RefCOCO_val RefCOCO+_testA RefCOCO+_testB RefCOCO+_val RefCOCOg_test RefCOCOg_val"
parse_args "$@"
if [ -n "${LMUData:-}" ] && [ -n "${PER_SPLIT:-}" ]; then
  usage_error "--per-split makes the embedded default's synthetic data; it does not apply with LMUData set"
fi
if [ -z "${LMUData:-}" ]; then
  export LMUData="$WORK/lmudata"
  echo "LMUData is not set: the embedded default (synthetic data in $LMUData, the tiny grounder)"
  # (re)made unless it holds exactly --per-split rows per split (8 splits); a work dir that answered
  # other synthetic data is refused by run.py, never reused. 50 pictures per split (400 per method, 2000 in
  # all; docs/harness.md has the measured times), on two CPU processes (one thread each) unless --nproc says
  # otherwise and there is no GPU
  PER_SPLIT=${PER_SPLIT:-50}
  if [ -z "$NPROC_GIVEN" ] && ! command -v nvidia-smi > /dev/null && [ "$(nproc)" -ge 2 ]; then NPROC=2; fi
  if [ ! -f "$LMUData/RefCOCO.tsv" ] || [ "$(($(wc -l < "$LMUData/RefCOCO.tsv") - 1))" -ne "$((8 * PER_SPLIT))" ]; then
    "$PY" -m ivcp data make-grounding --out "$LMUData" --per-split "$PER_SPLIT" --force > /dev/null
  fi
  MODELS=${MODELS:-Qwen2.5-VL-TinyGrounder}
  METHODS=${METHODS:-vanilla,fastv,pdrop,vscan,ivc_prune}
fi
MODELS=${MODELS:-Qwen2.5-VL-7B-Instruct}
METHODS=${METHODS:-vanilla,fastv,window_fastv,pdrop,vscan,ivc_prune}
launch
tables grounding table1_grounding.csv
finish
