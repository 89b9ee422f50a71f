#!/usr/bin/env bash
# General VQA (the paper's Tab. 2 InternVL rows) of InternVL pruned by ivcp, on the native transformers
# class (convert InternVL2.5 checkpoints first: scripts/convert_internvl.py), through the pip-installed
# VLMEvalKit. Needs the benchmarks' TSVs in $LMUData and, for judged benchmarks, VLMEvalKit's .env:
#
#   export LMUData=/data/LMUData IVCP_MODEL_ROOT=/models
#   bash VLMEvalKit/test_ivcp_internvl_generalvqa.sh --models "InternVL2_5-8B" --nproc 8
#   bash VLMEvalKit/test_ivcp_internvl_generalvqa.sh --data "TextVQA_VAL MMBench_DEV_EN_V11" \
#        --methods vanilla,ivc_prune_stage1,ivc_prune,ivc_prune_attention          # Tab. 7's VQA columns
#
# Prompts: VLMEvalKit's InternVLChat custom prompts, as the authors' wrapper keeps them (--prompts dataset
# for the datasets' own); the internvl2_5 system message; 6 tiles max. Exit status 1 when any run failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODELS=""; METHODS=""
DATA="SEEDBench_IMG MMBench_DEV_EN_V11 MMStar RealWorldQA MME POPE HallusionBench TextVQA_VAL AI2D_TEST"
parse_args "$@"
if [ -z "${LMUData:-}" ]; then
  echo "set LMUData to the folder with the benchmarks' TSVs (there is no synthetic general-VQA data)" >&2
  exit 2
fi
MODELS=${MODELS:-InternVL2_5-8B}
METHODS=${METHODS:-vanilla,fastv,window_fastv,pdrop,ivc_prune}
launch
tables general table2_general_vqa.csv
finish
