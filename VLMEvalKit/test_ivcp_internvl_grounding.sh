#!/usr/bin/env bash
# Grounding (RefCOCO / RefCOCO+ / RefCOCOg, Acc@0.5) of InternVL pruned by ivcp, on the native
# transformers class, through the pip-installed VLMEvalKit. InternVL2.5 checkpoints are remote code:
# convert them first (python scripts/convert_internvl.py --src /models/InternVL2_5-8B-remote
# --out /models/InternVL2_5-8B), then e.g. on 8 GPUs:
#
#   export LMUData=/data/LMUData IVCP_MODEL_ROOT=/models
#   bash VLMEvalKit/test_ivcp_internvl_grounding.sh --models "InternVL2_5-8B" --nproc 8      # Tab. 1 rows
#   bash VLMEvalKit/test_ivcp_internvl_grounding.sh --data "RefCOCO_testA RefCOCO+_testA" \
#        --methods vanilla,ivc_prune_stage1,ivc_prune,ivc_prune_attention                    # Tab. 7 rows
#
# Prompt: the authors' "Please provide the bounding box coordinate of the region this sentence
# describes: <ref>…</ref>"; answers [[x1, y1, x2, y2]] in 0–1000. Methods as the Qwen scripts, plus
# ivc_prune_authors (their thumbnail-driven InternVL code). Exit status 1 when any run failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODELS=""; METHODS=""
DATA="RefCOCO_testA RefCOCO_testB RefCOCO_val RefCOCO+_testA RefCOCO+_testB RefCOCO+_val RefCOCOg_test RefCOCOg_val"
parse_args "$@"
if [ -z "${LMUData:-}" ]; then
  echo "set LMUData to the folder with the grounding TSVs (or run test_ivcp_qwen_grounding.sh for the embedded default)" >&2
  exit 2
fi
MODELS=${MODELS:-InternVL2_5-8B}
METHODS=${METHODS:-vanilla,fastv,window_fastv,pdrop,ivc_prune}
launch
tables grounding table1_grounding.csv
finish
