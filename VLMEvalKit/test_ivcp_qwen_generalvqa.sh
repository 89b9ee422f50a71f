#!/usr/bin/env bash
# General VQA (the paper's Tab. 2 benchmarks) of Qwen-VL models pruned by ivcp, through the
# pip-installed VLMEvalKit. Needs the benchmarks' TSVs in $LMUData (VLMEvalKit's own format) and, for
# benchmarks judged by a model, VLMEvalKit's judge settings (its .env); e.g. on 8 GPUs:
#
#   export LMUData=/data/LMUData IVCP_MODEL_ROOT=/models
#   bash VLMEvalKit/test_ivcp_qwen_generalvqa.sh --models "Qwen2.5-VL-7B-Instruct" \
#        --methods vanilla,fastv,pdrop,vscan,ivc_prune --nproc 8 [--data "MMStar POPE"] [--prompts dataset]
#
# --prompts authors (default): every method gets the authors' custom prompts (their _IVCP runs);
# --prompts dataset: the datasets' own prompts (the authors' vanilla row). Exit status 1 when any run failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODELS=""; METHODS=""
DATA="SEEDBench_IMG MMBench_DEV_EN_V11 MMStar RealWorldQA MME POPE HallusionBench TextVQA_VAL AI2D_TEST"
parse_args "$@"
if [ -z "${LMUData:-}" ]; then
  echo "set LMUData to the folder with the benchmarks' TSVs (there is no synthetic general-VQA data)" >&2
  exit 2
fi
MODELS=${MODELS:-Qwen2.5-VL-7B-Instruct}
METHODS=${METHODS:-vanilla,fastv,pdrop,vscan,ivc_prune}
launch
tables general table2_general_vqa.csv
finish
