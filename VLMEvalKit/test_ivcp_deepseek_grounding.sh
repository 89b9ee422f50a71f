#!/usr/bin/env bash
# Grounding (RefCOCO / RefCOCO+ / RefCOCOg, Acc@0.5) of DeepSeek-VL2 pruned by ivcp, on ivcp's native class,
# through the pip-installed VLMEvalKit. The released checkpoints are remote code: convert first
# (python scripts/convert_deepseek_vl2.py --src /models/deepseek-vl2-small-remote --out /models/deepseek-vl2-small),
# then e.g. on 8 GPUs:
#
#   export LMUData=/data/LMUData IVCP_MODEL_ROOT=/models
#   bash VLMEvalKit/test_ivcp_deepseek_grounding.sh --nproc 8                                  # Tab. 1 rows
#
# Prompt: the authors' "<image>\nLocate <|ref|>…<|/ref|> in the given image."; answers
# <|ref|>…<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|> in 0–999 of the image. Methods as the Qwen scripts (the
# authors' own DeepSeek-VL2 rule is not yet an ivcp option: see configs/models/deepseek_vl2.toml).
# Exit status 1 when any run failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODELS=""; METHODS=""
DATA="RefCOCO_testA RefCOCO_testB RefCOCO_val RefCOCO+_testA RefCOCO+_testB RefCOCO+_val RefCOCOg_test RefCOCOg_val"
parse_args "$@"
if [ -z "${LMUData:-}" ]; then
  echo "set LMUData to the folder with the grounding TSVs (or run test_ivcp_qwen_grounding.sh for the embedded default)" >&2
  exit 2
fi
MODELS=${MODELS:-deepseek-vl2-small}  # or deepseek-vl2-tiny
METHODS=${METHODS:-vanilla,fastv,window_fastv,pdrop,ivc_prune}
launch
tables grounding table1_grounding.csv
finish
