#!/usr/bin/env python
"""VLMEvalKit's run, with ivcp's models and datasets registered first.

Same arguments and habits as upstream (``--data``, ``--model``, ``--work-dir``, ``$LMUData``,
``torchrun --nproc-per-node=N``). ivcp adds its model names (``python -m ivcp models`` lists them:
each model of configs/eval.toml × method suffix × prompt protocol) and the grounding splits
RefCOCO_testA … RefCOCOg_val. On top of upstream:

- unknown model names stop the run before anything is loaded (exit 2); so do an unset or mistyped
  ``$LMUData`` (VLMEvalKit would fall back to ~/LMUData) and a work dir whose outputs answer other
  data than the current TSVs (``ivcp.eval.rundata``: each model x dataset records the file and sha256
  it answers); a prediction file cut short by a killed write is moved aside and made again;
- per-sample pruning statistics go to ``<work dir>/ivcp_stats`` (unless ``IVCP_STATS_DIR`` is set);
- VLMEvalKit logs a failed model × dataset and goes on: here every such failure, and every
  model × dataset left without predictions, is listed at the end and the exit status is 1.
"""

import logging
import os
import os.path as osp
import sys

from ivcp.eval.grounding import GROUNDING_PROMPTS, GROUNDING_SPLITS
from ivcp.eval.protocol import all_run_names
from ivcp.eval.rundata import check_work_dir, lmudata_root
from ivcp.vlmeval_plugin import register

register()

from vlmeval.config import supported_VLM  # noqa: E402  (after registration, on purpose)
from vlmeval.run import main, parse_args  # noqa: E402
from vlmeval.smp import load_env  # noqa: E402


class _Failures(logging.Handler):
    """Collects the errors VLMEvalKit logs (it logs a failed model × dataset and carries on)."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0][:300])


def _ranks_on_gloo_without_gpu() -> None:
    """VLMEvalKit starts several ranks with ``init_process_group(backend='nccl')``, hard-coded, and NCCL
    needs GPUs: where none is present the ranks talk over gloo instead (VLMEvalKit itself unmodified;
    its barriers are all it asks of the process group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        return
    init = dist.init_process_group

    def init_process_group(*args, **kwargs):
        if kwargs.get("backend", args[0] if args else None) == "nccl":
            args, kwargs = args[1:], {**kwargs, "backend": "gloo"}
        return init(*args, **kwargs)

    dist.init_process_group = init_process_group


def _one_thread_for_offline_models(models: list[str]) -> None:
    """The embedded offline models (ivcp's tiny ones, ~1 M parameters) run on one CPU thread per process: their
    matrices are too small for torch's intra-op threads to pay, and on a busy machine those threads wait on
    each other (measured on the shared 2-core machine: 0.14 s per picture on one thread, 1.2-2.6 s on two).
    Predictions are unchanged (tests/test_vlmeval_plugin.py). Not where ``OMP_NUM_THREADS`` is set, on a GPU, or
    for a real checkpoint."""
    runs = all_run_names()
    if os.environ.get("OMP_NUM_THREADS") or not models or not all(m in runs and runs[m].model.offline for m in models):
        return
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)


def run() -> int:
    _ranks_on_gloo_without_gpu()
    load_env()  # VLMEvalKit's .env (judge API keys), as its own entry point does
    args = parse_args()
    unknown = [m for m in args.model or [] if m not in supported_VLM]
    if unknown:
        print(f"run.py: unknown model name(s): {', '.join(unknown)} (`python -m ivcp models` lists ivcp's)",
              file=sys.stderr)
        return 2
    families = {m: run.model.family for m, run in all_run_names().items() if m in (args.model or [])}
    no_prompt = [f"{m} ({family})" for m, family in families.items() if family not in GROUNDING_PROMPTS]
    if no_prompt and any(d in GROUNDING_SPLITS for d in args.data or []):
        print(f"run.py: no grounding prompt for {', '.join(no_prompt)}: grounding runs need a family with one "
              f"({', '.join(GROUNDING_PROMPTS)})", file=sys.stderr)
        return 2
    try:
        root = lmudata_root()
    except ValueError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("IVCP_STATS_DIR", osp.join(args.work_dir, "ivcp_stats"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    errors, notes = check_work_dir(args.work_dir, args.model or [], args.data or [], root,
                                   os.environ["IVCP_STATS_DIR"], write=rank0)
    for line in notes:
        print(f"run.py: {line}", file=sys.stderr)
    if errors:
        for line in errors:
            print(f"run.py: stale outputs: {line}", file=sys.stderr)
        return 2
    _one_thread_for_offline_models(args.model or [])
    failures = _Failures()
    logging.getLogger("vlmeval").addHandler(failures)
    main()
    missing = [f"{m} x {d}: no predictions were written" for m in args.model or [] for d in args.data or []
               if not any(osp.exists(osp.join(args.work_dir, m, f"{m}_{d}.{ext}")) for ext in ("xlsx", "tsv", "json"))]
    if int(os.environ.get("RANK", "0")) == 0 and (failures.messages or missing):
        print(f"\nrun.py: {len(failures.messages)} error(s) logged, {len(missing)} model x dataset pair(s) "
              "without predictions:", file=sys.stderr)
        for line in failures.messages + missing:
            print(f"  FAILED {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
