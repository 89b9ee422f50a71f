#!/usr/bin/env python
"""Collect VLMEvalKit outputs into the paper's tables (results/*.md and *.csv).

    python scripts/collect_results.py --work-dir outputs/vlmeval --model Qwen2.5-VL-7B-Instruct \
        --methods vanilla,fastv,window_fastv,pdrop,vscan,ivc_prune --kind grounding \
        --paper results/paper/table1_grounding.csv --paper-model "Qwen2.5-VL 7B" --out results
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ivcp import results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="VLMEvalKit's --work-dir")
    parser.add_argument("--model", required=True, help="base model name, e.g. Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--methods", default="vanilla,fastv,pdrop,vscan,ivc_prune")
    parser.add_argument("--kind", choices=["grounding", "general"], default="grounding")
    parser.add_argument("--benchmarks", default="", help="comma list (default: the paper's)")
    parser.add_argument("--paper", default="", help="a results/paper/*.csv to show beside ours")
    parser.add_argument("--paper-model", default="", help="the paper's model label, e.g. 'Qwen2.5-VL 7B'")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    benchmarks = [b for b in args.benchmarks.split(",") if b] or results.default_benchmarks(args.kind)
    try:
        rows = results.build_table(args.work_dir, args.model, methods, benchmarks, args.kind)
    except ValueError as error:
        print(f"collect_results: error: {error}", file=sys.stderr)
        return 2
    paper = results.paper_rows(args.paper, args.paper_model) if args.paper else None
    title = f"{'Grounding (Acc@0.5)' if args.kind == 'grounding' else 'General VQA'}: {args.model}"
    markdown, table = results.render(rows, benchmarks, title,
                                     results.provenance(args.model, methods, args.work_dir, args.note), paper)
    print(markdown)
    for path in results.write(markdown, table, args.out, f"{args.kind}_{args.model}"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
