#!/usr/bin/env python
"""Collect VLMEvalKit outputs into the paper's tables (results/*.md and *.csv).

    python scripts/collect_results.py --work-dir outputs/vlmeval --model Qwen2.5-VL-7B-Instruct \
        --methods vanilla,fastv,window_fastv,pdrop,vscan,ivc_prune --kind grounding \
        --paper results/paper/table1_grounding.csv --paper-model "Qwen2.5-VL 7B" --out results

Grounding tables show the authors' strict Acc@0.5 ± standard error (n pictures) per cell and, below it,
the lenient parse where it differs in some cell; the budgets line says which methods ran at matched
budgets (Average Tokens within 5 points). Each table lists the data file and sha256 its cells answer;
a cell whose predictions are damaged or answer another file than the one in --lmudata ($LMUData) now
is shown as missing. Exit status 1 (with the list and the reasons on stderr) when any model x
benchmark has no result; 2 on bad arguments.
"""

import argparse
import os
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
    parser.add_argument("--prompts", default="authors", help="the prompt protocol of the runs (configs/eval.toml)")
    parser.add_argument("--lmudata", default=None,
                        help="the folder of the benchmarks' TSVs (default: $LMUData): a cell whose predictions answer "
                             "another file than the one there now is shown as missing")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    lmudata = os.environ.get("LMUData") if args.lmudata is None else args.lmudata
    if lmudata and not Path(lmudata).is_dir():
        print(f"collect_results: error: --lmudata / LMUData {lmudata} is not a folder", file=sys.stderr)
        return 2
    benchmarks = [b for b in args.benchmarks.split(",") if b] or results.default_benchmarks(args.kind)
    try:
        tables = [("paper", results.build_table(args.work_dir, args.model, methods, benchmarks, args.kind, args.prompts,
                                                lmudata=lmudata or None))]
        if args.kind == "grounding":
            tables.append(("lenient", results.build_table(args.work_dir, args.model, methods, benchmarks, args.kind,
                                                          args.prompts, metric="lenient", lmudata=lmudata or None)))
    except ValueError as error:
        print(f"collect_results: error: {error}", file=sys.stderr)
        return 2
    paper = results.paper_rows(args.paper, args.paper_model) if args.paper else None
    info = results.provenance(args.model, methods, args.work_dir, args.note, args.prompts)
    info.update(results.data_provenance(tables[0][1], benchmarks, lmudata or None))
    info["budgets"] = results.budget_note(tables[0][1])
    if len(tables) == 2 and results.same_scores(tables[0][1], tables[1][1]):
        info["lenient parse"] = "the same score as the strict metric in every cell (its table is not printed)"
        tables = tables[:1]
    stem = f"{args.kind}_{args.model}" + ("" if args.prompts == "authors" else f"_{args.prompts}")
    for metric, rows in tables:
        if args.kind == "grounding":
            title = f"Grounding, Acc@0.5 ({'the authors' + chr(39) + ' strict metric' if metric == 'paper' else 'lenient parse'}): {args.model}"
        else:
            title = f"General VQA: {args.model}"
        markdown, table = results.render(rows, benchmarks, title, info, paper if metric == "paper" else None)
        print(markdown)
        for path in results.write(markdown, table, args.out, stem + ("" if metric == "paper" else "_lenient")):
            print(f"wrote {path}")
    missing = results.missing_results(tables[0][1])
    if missing:
        print(f"collect_results: {len(missing)} result(s) missing:", file=sys.stderr)
        for line in missing:
            print(f"  MISSING {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
