#!/usr/bin/env bash
# General VQA (the paper's Tab. 2 DeepSeek-VL2 rows) of DeepSeek-VL2 pruned by ivcp, on ivcp's native class
# (convert the released checkpoint first: scripts/convert_deepseek_vl2.py), through the pip-installed VLMEvalKit.
# Needs the benchmarks' TSVs in $LMUData and, for judged benchmarks, VLMEvalKit's .env:
#
#   export LMUData=/data/LMUData IVCP_MODEL_ROOT=/models
#   bash VLMEvalKit/test_ivcp_deepseek_generalvqa.sh --nproc 8
#
# Prompts: the datasets' own (the authors' DeepSeek-VL2 wrapper has no custom prompt outside grounding), each
# image as "<image>\n" before the text, the released chat format; greedy, max_new_tokens 2048.
# Exit status 1 when any run failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODELS=""; METHODS=""
DATA="SEEDBench_IMG MMBench_DEV_EN_V11 MMStar RealWorldQA MME POPE HallusionBench TextVQA_VAL AI2D_TEST"
parse_args "$@"
if [ -z "${LMUData:-}" ]; then
  echo "set LMUData to the folder with the benchmarks' TSVs (there is no synthetic general-VQA data)" >&2
  exit 2
fi
MODELS=${MODELS:-deepseek-vl2-small}  # or deepseek-vl2-tiny
METHODS=${METHODS:-vanilla,fastv,window_fastv,pdrop,ivc_prune}
launch
tables general table2_general_vqa.csv
finish
