#!/usr/bin/env python
"""VLMEvalKit's run, with ivcp's models and datasets registered first.

Same arguments and habits as upstream (``--data``, ``--model``, ``--work-dir``, ``$LMUData``,
``torchrun --nproc-per-node=N``): ivcp adds the model names ``Qwen2.5-VL-{3B,7B,32B}-Instruct`` (vanilla
through ivcp's wrapper) and their ``_IVCP``, ``_Grounding_IVCP``, ``_FastV``, ``_WFastV``, ``_PDrop``,
``_VScan``, ``_AdaptPrune``, ``_Random`` siblings, the same for ``Qwen2-VL-7B-Instruct``, the offline
``Qwen2.5-VL-Tiny`` / ``Qwen2-VL-Tiny`` family, and the grounding splits RefCOCO_testA … RefCOCOg_val.
"""

from ivcp.vlmeval_plugin import register

register()

from vlmeval.run import main  # noqa: E402  (after registration, on purpose)

if __name__ == "__main__":
    main()
