#!/usr/bin/env bash
# General VQA (the paper's Tab. 2 LLaVA rows, and Tab. 16's low budgets) of LLaVA-1.5 pruned by ivcp, on
# the native transformers class (llava-hf weights), through the pip-installed VLMEvalKit. Needs the
# benchmarks' TSVs in $LMUData and, for judged benchmarks, VLMEvalKit's judge settings (its .env):
#
#   export LMUData=/data/LMUData IVCP_MODEL_ROOT=/models     # /models/llava-1.5-7b-hf
#   bash VLMEvalKit/test_ivcp_llava_generalvqa.sh --nproc 8                    # Tab. 2
#   bash VLMEvalKit/test_ivcp_llava_generalvqa.sh --nproc 8 \
#        --methods vanilla,fastv:Keep33,fastv:Keep22,fastv:Keep11,ivc_prune:Keep33,ivc_prune:Keep22,ivc_prune:Keep11
#                                                                              # Tab. 16 (192 / 128 / 64 tokens)
#
# Methods: ivc_prune (ivcp's defaults: 30 % of the image, filled), ivc_prune_authors (the authors' LLaVA
# code: IVC 5 % + 5 % ∪ seeds ∪ top 20 % foreground, no fill), fastv (R = 75 %), pdrop (λ 0.5 at layers
# 8, 16, 24), vscan, window_fastv, random, <method>:Keep33|Keep22|Keep11. Prompts: the authors' LLaVA
# wrapper (Vicuna-v1 text, MCQ custom prompt); --prompts dataset for the datasets' own.
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
MODELS=${MODELS:-llava-1.5-7b-hf}
METHODS=${METHODS:-vanilla,fastv,pdrop,vscan,ivc_prune,ivc_prune_authors}
launch
if [[ "$METHODS" == *:Keep* ]]; then
  tables general table16_low_budget_llava_1_5_7b.csv
else
  tables general table2_general_vqa.csv
fi
finish
