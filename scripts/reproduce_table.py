#!/usr/bin/env python
"""One table of the IVC-Prune paper (arXiv 2602.03060), end to end, through the evaluation harness.

    python scripts/reproduce_table.py --table N [--models M[,LABEL=M...]] [--data D,...] [--per-split K]
                                      [--nproc P] [--out DIR] [--work-dir DIR] [--list]

N is one of 1, 2, 3, 4, 5, 6, 7, 11, 16, 17. The table's rows (the paper's methods, options, budgets
and models: configs/eval.toml entries) run on its benchmarks through VLMEvalKit/run.py (every run a
registered model name, ``--reuse``: a rerun answers only what is missing), then ``table_N.md`` / ``.csv``
are written in the paper's layout, each cell "ours ± standard error (n pictures)" beside the paper's
published value (results/paper/), with Avg. tokens (visual KV kept, from the run's statistics), Rel.
Avg. (mean of score / the same model's vanilla score) and how the table was made.

- Models: the paper's model of each row (configs/eval.toml, weights from $IVCP_MODEL_ROOT or the hub).
  ``--models`` replaces them: ``LABEL=MODEL`` for one of the paper's models ("Qwen2.5-VL 7B=...");
  a bare MODEL stands in for the paper's main model of its family (Qwen2.5-VL 7B, InternVL 2.5 8B,
  LLaVA-v1.5 7B). Rows of a paper model that is not run say "needs <model>".
- Data: $LMUData. Without it, the embedded default: synthetic RefCOCO-format splits (``--per-split``
  pictures each, default 50) and the trained tiny grounder (Qwen2.5-VL-TinyGrounder) for the
  Qwen2.5-VL rows; benchmarks that need real data say "needs <dataset>", never empty.
- Table 3 (efficiency): KV MB, prefill and decode time from ``ivcp bench`` on the row's model,
  accuracy on RefCOCO_testA from the harness.
- Every row's method and options are checked on its model family before any inference (a tiny model
  of the family runs the method once): a combination that does not exist is refused (exit 2).
Exit status 1 when a run failed or a cell that should have a result has none.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ivcp import results  # noqa: E402
from ivcp.eval.grounding import GROUNDING_SPLITS  # noqa: E402
from ivcp.eval.protocol import DEFAULT_PROTOCOL, METHODS, MODELS, ivcp_method, method_params, run_name  # noqa: E402

PAPER_DIR = ROOT / "results" / "paper"
EMBEDDED_MODEL = "Qwen2.5-VL-TinyGrounder"
DEFAULT_PER_SPLIT = 50

# The paper's model names -> ours (configs/eval.toml). A model entry with a matching ``paper_label`` wins.
PAPER_MODELS = {"Qwen2.5-VL 7B": "Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL 3B": "Qwen2.5-VL-3B-Instruct",
                "Qwen2.5-VL 32B": "Qwen2.5-VL-32B-Instruct", "InternVL 2.5 8B": "InternVL2_5-8B",
                "LLaVA-v1.5 7B": "llava-1.5-7b-hf", "DeepSeek-VL2 Small-16B": None}
SIZE_LABELS = {"3B": "Qwen2.5-VL 3B", "7B": "Qwen2.5-VL 7B", "32B": "Qwen2.5-VL 32B"}  # Tab. 5's model_size
FAMILY_MAIN = {"qwen2_5_vl": "Qwen2.5-VL 7B", "internvl": "InternVL 2.5 8B", "llava": "LLaVA-v1.5 7B"}

# The paper's method labels -> harness entries (configs/eval.toml [methods])
METHOD_LABELS = {"Vanilla": "vanilla", "Vanilla (No Pruning)": "vanilla", "FastV": "fastv", "W-FastV": "window_fastv",
                 "Win. FastV": "window_fastv", "PDrop": "pdrop", "VScan": "vscan", "IVC-Prune": "ivc_prune",
                 "Stage 1": "ivc_prune_stage1", "Stage 1 + Stage 2": "ivc_prune",
                 "Stage 1+2 w/ Text-Image Attention": "ivc_prune_attention",
                 "Foreground tokens": "fg_only", "Foreground tokens only": "fg_only",
                 "Foreground + 10% IVC tokens": "fg_ivc10"}
TABLE4 = {("Vanilla", "Default"): "vanilla", ("Vanilla", "w/o IVC"): "drop_ivc", ("IVC-Prune", "Default"): "ivc_prune",
          ("IVC-Prune", "w/o IVC"): "ivc_prune_no_ivc", ("FastV", "Default"): "fastv", ("FastV", "w/ IVC"): "fastv_ivc",
          ("PDrop", "Default"): "pdrop", ("PDrop", "w/ IVC"): "pdrop_ivc"}
TABLE6 = {"none": "fg_only", "random_15": "fg_random15", "corner_points_centre": "fg_corners", "window": "fg_window",
          "diagonal": "fg_diagonal", "ivc_5": "fg_ivc5", "ivc_10": "fg_ivc10", "ivc_20": "fg_ivc20",
          "baseline_no_pruning": "vanilla"}
TABLE17 = {"5%": "ivc_prune_ivc5", "10%": "ivc_prune", "20%": "ivc_prune_ivc20"}
BUDGET_PERCENT = {"33": "Keep33", "22": "Keep22", "11": "Keep11"}  # Tab. 16's "192 (33.3%)"
# Table 3's measured columns (ivcp bench) and where the accuracy comes from
BENCH_COLUMNS = ("kv_cache_mb", "prefill_ms", "decode_ms_per_token")
TABLE3_ACCURACY = {"accuracy_refcoco_testA": "RefCOCO_testA"}
DATASET_NAMES = {"GQA_choose_all": "GQA (choose-all, the paper's Tab. 6 subset)"}


@dataclass(frozen=True)
class Row:
    """One row of a paper table (one column of Tab. 6, which is printed transposed)."""

    key: tuple[str, ...]  # the paper's labels of the row (its key columns)
    paper_model: str  # the paper's model name
    method: str | None  # harness entry (":KeepNN" budget allowed); None: no harness setting exists
    why_not: str = ""  # why there is no harness setting


@dataclass
class Spec:
    number: int
    paper_file: str
    title: str
    keys: tuple[str, ...]  # key columns of the paper's CSV
    columns: tuple[str, ...]  # the paper's value columns (benchmarks, or Tab. 3's measurements)
    rows: list[Row] = field(default_factory=list)
    transposed: bool = False  # Tab. 6: benchmarks are rows, settings are columns
    paper: list[dict] = field(default_factory=list)

    @property
    def benchmarks(self) -> list[str]:
        if self.number == 3:
            return list(TABLE3_ACCURACY.values())
        return [c for c in self.columns if c not in ("avg_tokens", "rel_avg")]


def _read_paper(name: str) -> tuple[list[str], list[dict]]:
    path = PAPER_DIR / name
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _method(label: str, table: int) -> str:
    if label not in METHOD_LABELS:
        raise ValueError(f"table {table}: no harness entry for the paper's method {label!r}")
    return METHOD_LABELS[label]


def table_spec(number: int) -> Spec:
    """The rows and columns of paper table ``number`` with the harness setting of each row."""
    files = {1: "table1_grounding.csv", 2: "table2_general_vqa.csv", 3: "table3_efficiency.csv",
             4: "table4_ivc_ablation_qwen2_5_vl_7b.csv", 5: "table5_model_sizes_qwen2_5_vl.csv",
             6: "table6_patterns_qwen2_5_vl_7b.csv", 7: "table7_foreground_ablation_internvl2_5_8b.csv",
             11: "table11_foreground_plus_ivc.csv", 16: "table16_low_budget_llava_1_5_7b.csv",
             17: "table17_ivc_share_qwen2_5_vl_7b.csv"}
    titles = {1: "Visual grounding (Acc@0.5)", 2: "General VQA", 3: "Efficiency (RefCOCO testA)",
              4: "IVC tokens: with and without", 5: "Model sizes (Qwen2.5-VL)", 6: "Tokens kept with the foreground",
              7: "Foreground stages (InternVL2.5-8B)", 11: "Foreground alone and with 10 % IVC tokens",
              16: "Low budgets (LLaVA-1.5-7B)", 17: "IVC share of a fixed 50 % budget"}
    if number not in files:
        raise ValueError(f"no table {number}; tables: {', '.join(map(str, files))}")
    header, paper = _read_paper(files[number])
    spec = Spec(number, files[number], f"Table {number}: {titles[number]}", (), (), paper=paper)
    if number == 6:
        spec.keys, spec.columns, spec.transposed = ("benchmark",), tuple(r["benchmark"] for r in paper), True
        spec.rows = [Row((c,), "Qwen2.5-VL 7B", TABLE6[c]) for c in header[1:]]
        return spec
    keys = {1: ("model", "method"), 2: ("model", "method"), 3: ("model", "method"), 4: ("method", "config"),
            5: ("model_size", "method"), 7: ("method",), 11: ("model", "inputs"), 16: ("method", "avg_tokens"),
            17: ("ivc_ratio",)}[number]
    spec.keys = keys
    spec.columns = tuple(c for c in header if c not in keys)
    implicit = {4: "Qwen2.5-VL 7B", 7: "InternVL 2.5 8B", 16: "LLaVA-v1.5 7B", 17: "Qwen2.5-VL 7B"}
    for r in paper:
        key = tuple(r[k] for k in keys)
        model = SIZE_LABELS[r["model_size"]] if number == 5 else r.get("model", implicit.get(number, ""))
        if number == 4:
            method = TABLE4[key]
        elif number == 17:
            method = TABLE17[r["ivc_ratio"]]
        elif number == 11:
            method = _method(r["inputs"], number)
        else:
            method = _method(r["method"], number)
        why = ""
        if number == 16 and method != "vanilla":
            percent = r["avg_tokens"].partition("(")[2].split(".")[0]
            budget = BUDGET_PERCENT[percent]
            from ivcp.eval.protocol import BUDGET_METHODS
            if method in BUDGET_METHODS:
                method = f"{method}:{budget}"
            else:
                why = (f"no harness setting of {method} at {percent} % (configs/eval.toml [budgets] lists "
                       f"{', '.join(BUDGET_METHODS)})")
                method = None
        spec.rows.append(Row(key, model, method, why))
    return spec


def listing(spec: Spec) -> dict:
    """The table's rows and columns as the paper prints them, with the harness setting of each row."""
    if spec.transposed:
        rows, columns = list(spec.columns), [r.key[0] for r in spec.rows]
    else:
        rows, columns = [" | ".join(r.key) for r in spec.rows], list(spec.columns)
    return {"table": spec.number, "paper": f"results/paper/{spec.paper_file}", "keys": list(spec.keys),
            "rows": rows, "columns": columns,
            "settings": [{"row": " | ".join(r.key), "model": r.paper_model, "method": r.method or f"– ({r.why_not})",
                          "params": _params_text(r.method)} for r in spec.rows]}


def _params_text(method: str | None) -> str:
    if method is None:
        return ""
    entry, _, budget = method.partition(":")
    params = dict(METHODS[entry].get("params", {}))
    if budget:
        from ivcp.eval.protocol import budget_params
        params.update({k: round(v, 4) if isinstance(v, float) else v for k, v in budget_params(entry, "_" + budget).items()})
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    method_name = ivcp_method(entry) or "none (unpruned)"
    return f"{method_name}({text})" if text else method_name


# --- models ----------------------------------------------------------------------------------------

def default_model(paper_label: str) -> str | None:
    """Our model for one of the paper's models (None where ivcp has no entry for it)."""
    for name, entry in MODELS.items():
        if entry.paper_label == paper_label:
            return name
    return PAPER_MODELS.get(paper_label)


def model_plan(spec: Spec, models: list[str], embedded: bool) -> dict[str, str | None]:
    """The paper's model label -> the model that runs its rows (None: not run)."""
    labels = list(dict.fromkeys(r.paper_model for r in spec.rows))
    if not models:
        if embedded:
            return {label: EMBEDDED_MODEL if label == FAMILY_MAIN["qwen2_5_vl"] else None for label in labels}
        return {label: default_model(label) for label in labels}
    plan: dict[str, str | None] = {label: None for label in labels}
    for item in models:
        label, _, name = item.rpartition("=")
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; ivcp's models: {', '.join(MODELS)}")
        if not label:
            family = MODELS[name].family
            if family not in FAMILY_MAIN:
                raise ValueError(f"--models {name}: no paper model of family {family!r} to stand in for; write "
                                 f"LABEL={name} with LABEL one of: {', '.join(labels)}")
            label = FAMILY_MAIN[family]
        if label not in plan:
            raise ValueError(f"--models {item}: table {spec.number} has no model {label!r}; its models: {', '.join(labels)}")
        plan[label] = name
    return plan


# --- the check before inference --------------------------------------------------------------------

_FAMILY_PROBES: dict[str, tuple] = {}


def check_method(model: str, method: str) -> None:
    """Refuse (ValueError, one line) a method / option that does not exist or cannot run on ``model``'s
    family: the options are built, then the method runs one prefill on a tiny model of the family."""
    import torch

    import ivcp
    import ivcp.testing as testing

    entry, _, budget = method.partition(":")
    run_name(model, method)  # the name exists
    family = MODELS[model].family
    name = ivcp_method(entry)
    if name is None:
        return
    params = method_params(entry, family)
    if budget:
        from ivcp.eval.protocol import budget_params
        params.update(budget_params(entry, "_" + budget))
    try:
        ivcp.make_method(name, **params)
        if family not in testing.FAMILIES:
            return  # no tiny model to try it on: the options were checked above
        if family not in _FAMILY_PROBES:
            tiny, processor = testing.tiny_model(family)
            inputs = testing.make_inputs(processor, "Where is the square?", images=[testing.make_image()])
            _FAMILY_PROBES[family] = (tiny, inputs)
        tiny, inputs = _FAMILY_PROBES[family]
        layers = [v for v in (*params.get("stage_layers", ()), params.get("selection_layer")) if isinstance(v, int)]
        if layers and max(layers) >= tiny.config.get_text_config().num_hidden_layers:
            return  # layers set for the real model's depth (PDrop's budgets): the options were checked above
        with ivcp.prune(tiny, name, **params), torch.no_grad():
            tiny(**inputs)
    except (ValueError, NotImplementedError, TypeError) as error:
        raise ValueError(f"{method} ({_params_text(method)}) cannot run on {model} (family {family}): "
                         f"{str(error).splitlines()[0]}") from None


# --- running ---------------------------------------------------------------------------------------

def _needs_dataset(bench: str) -> str:
    return f"needs {DATASET_NAMES.get(bench, bench)}"


@dataclass
class Plan:
    spec: Spec
    models: dict[str, str | None]
    embedded: bool
    data: list[str]  # --data (empty: all)
    lmudata: Path
    work: Path  # VLMEvalKit's work dir
    runs: dict[tuple[int, str], str] = field(default_factory=dict)  # (row index, benchmark) -> model name
    notes: dict[tuple[int, str], str] = field(default_factory=dict)  # (row index, benchmark) -> why no number

    def build(self) -> "Plan":
        for i, row in enumerate(self.spec.rows):
            model = self.models.get(row.paper_model)
            for bench in self.spec.benchmarks:
                if row.method is None:
                    self.notes[i, bench] = row.why_not
                elif model is None:
                    ours = default_model(row.paper_model)
                    self.notes[i, bench] = f"needs {ours or row.paper_model}" + (
                        "" if ours else " (no ivcp model entry)")
                elif bench not in GROUNDING_SPLITS and (self.embedded or not self._has_data(bench)):
                    self.notes[i, bench] = _needs_dataset(bench)
                elif self.data and bench not in self.data:
                    self.notes[i, bench] = "not run (--data)"
                else:
                    self.runs[i, bench] = run_name(model, row.method)
        return self

    def _has_data(self, bench: str) -> bool:
        return (self.lmudata / f"{bench}.tsv").is_file()

    def model_names(self) -> list[str]:
        return list(dict.fromkeys(self.runs.values()))

    def datasets(self) -> list[str]:
        return [b for b in self.spec.benchmarks if any(k[1] == b for k in self.runs)]


def launch(plan: Plan, nproc: int) -> int:
    """VLMEvalKit/run.py on every model name × dataset of the plan (resumable: --reuse)."""
    names, datasets = plan.model_names(), plan.datasets()
    if not names:
        return 0
    script = str(ROOT / "VLMEvalKit" / "run.py")
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script] if nproc > 1 \
        else [sys.executable, script]
    command = [*head, "--data", *datasets, "--model", *names, "--work-dir", str(plan.work), "--reuse"]
    env = dict(os.environ, LMUData=str(plan.lmudata), IVCP_STATS_DIR=str(plan.work / "ivcp_stats"))
    print("running: " + shlex.join(command), flush=True)
    return subprocess.run(command, env=env, cwd=str(ROOT)).returncode


def make_embedded_data(lmudata: Path, per_split: int) -> None:
    if (lmudata / "RefCOCO_testA.tsv").is_file() or (lmudata / "RefCOCO.tsv").is_file():
        return
    subprocess.run([sys.executable, "-m", "ivcp", "data", "make-grounding", "--out", str(lmudata), "--per-split",
                    str(per_split)], check=True, stdout=subprocess.DEVNULL, cwd=str(ROOT))


def bench_model(model: str) -> str:
    """What ``ivcp bench --model`` loads for one of our models (tiny spec, $IVCP_MODEL_ROOT folder or hub id)."""
    entry = MODELS[model]
    if entry.offline:
        return entry.hub_id
    root = os.environ.get("IVCP_MODEL_ROOT")
    for name in (model, entry.hub_id.split("/")[-1]):
        if root and (Path(root) / name).is_dir():
            return str(Path(root) / name)
    return entry.hub_id


def run_bench(plan: Plan, out: Path) -> dict[tuple[str, str], dict]:
    """Table 3's KV / prefill / decode columns: ``ivcp bench`` once per model (kept in the work dir:
    a rerun reads it back). (model, harness method) -> the bench row."""
    found: dict[tuple[str, str], dict] = {}
    by_model: dict[str, list[str]] = {}
    for row in plan.spec.rows:
        model = plan.models.get(row.paper_model)
        if model is not None and row.method is not None:
            by_model.setdefault(model, []).append(ivcp_method(row.method) or "vanilla")
    for model, methods in by_model.items():
        folder = out / f"bench-{model}"
        if not (folder / "bench.json").is_file():
            entry = MODELS[model]  # a COCO-sized picture (640×480) where the model's pixel bounds allow it
            size = "640x480" if entry.max_pixels is None or entry.max_pixels >= 640 * 480 else "448x336"
            command = [sys.executable, "-m", "ivcp", "bench", "--model", bench_model(model), "--methods",
                       ",".join(dict.fromkeys(methods)), "--image-sizes", size, "--repeats", "5",
                       "--new-tokens", "16", "--out", str(folder)]
            print("running: " + shlex.join(command), flush=True)
            if subprocess.run(command, cwd=str(ROOT)).returncode != 0:
                continue
        report = json.loads((folder / "bench.json").read_text())
        for entry in report["rows"]:
            found[model, entry["method"]] = {**entry, "_command": report.get("command", "")}
    return found


# --- the table ---------------------------------------------------------------------------------------

@dataclass
class Cell:
    value: float | None = None
    n: int | None = None
    note: str = ""
    digits: int = 1

    def text(self) -> str:
        if self.value is None:
            return self.note or "–"
        if self.n is None:
            return f"{self.value:.{self.digits}f}"
        return results.format_score(self.value, self.n, self.digits)


def collect(plan: Plan, bench: dict | None = None) -> list[dict]:
    """Per row: cells by column, Avg. tokens, Rel. Avg. (against the same model's vanilla row)."""
    from ivcp.eval import stats

    spec, out = plan.spec, []
    for i, row in enumerate(spec.rows):
        cells, shares = {}, []
        for b in spec.benchmarks:
            if (i, b) in plan.notes:
                cells[b] = Cell(note=plan.notes[i, b])
                continue
            name = plan.runs[i, b]
            if b in GROUNDING_SPLITS:
                value = results.grounding_score(plan.work, name, b)
                n = results.grounding_count(plan.work, name, b)
            else:
                value, n = results.general_score(plan.work, name, b), None
            cells[b] = Cell(value, n, "" if value is not None else "MISSING (the run failed: see its log)")
            share = stats.average_share(name, b, root=plan.work / "ivcp_stats")
            if value is not None and share is not None:
                shares.append(share)
        model = plan.models.get(row.paper_model)
        out.append({"row": row, "model": model, "cells": cells,
                    "avg_tokens": sum(shares) / len(shares) if shares else None})
    for entry in out:
        vanilla = next((v for v in out if v["model"] == entry["model"] and v["row"].method == "vanilla"), None)
        entry["rel_avg"] = None
        if vanilla is not None and entry["model"] is not None:
            entry["rel_avg"] = results.relative_average({b: c.value for b, c in entry["cells"].items()},
                                                        {b: c.value for b, c in vanilla["cells"].items()})
    if spec.number == 3:
        for entry in out:
            measured = (bench or {}).get((entry["model"], ivcp_method(entry["row"].method or "") or "vanilla"))
            base = (bench or {}).get((entry["model"], "vanilla"))
            entry["cells"] = _table3_cells(entry, measured, base)
    return out


def _table3_cells(entry: dict, measured: dict | None, base: dict | None) -> dict[str, Cell]:
    cells = {c: Cell(note="needs ivcp bench on this model" if entry["model"] else entry["cells"]["RefCOCO_testA"].note)
             for c in BENCH_COLUMNS}
    if measured is not None:
        cells["kv_cache_mb"] = Cell(measured["kv_bytes"] / 2 ** 20, digits=3)
        cells["prefill_ms"] = Cell(measured["prefill_ms"]["median"], digits=1)
        cells["decode_ms_per_token"] = Cell(measured["decode_ms_per_token"]["median"], digits=2)
        if base is not None:  # the paper's "(1.6×)": vanilla over the method
            for column, key in (("kv_cache_mb", "kv_bytes"), ("prefill_ms", "prefill_ms"),
                                ("decode_ms_per_token", "decode_ms_per_token")):
                ours, ref = measured[key], base[key]
                ours, ref = (ours["median"], ref["median"]) if isinstance(ours, dict) else (ours, ref)
                cells[column].note = f" ({ref / ours:.2f}×)" if ours else ""
        entry["avg_tokens"] = measured.get("visual_kv_share", entry["avg_tokens"])
    cells["total_time"] = Cell(note="not measured (the paper's wall time of the whole split on its GPUs)")
    cells["accuracy_refcoco_testA"] = entry["cells"]["RefCOCO_testA"]
    return cells


def _cell_text(cell: Cell) -> str:
    text = cell.text()
    return text + cell.note if cell.value is not None and cell.note.startswith(" (") else text


def _paper_value(spec: Spec, row_index: int, column: str) -> str:
    if spec.transposed:
        paper_row = next(r for r in spec.paper if r["benchmark"] == column)
        return paper_row[spec.rows[row_index].key[0]]
    return spec.paper[row_index].get(column, "")


def render(plan: Plan, collected: list[dict], provenance: dict) -> tuple[str, list[list[str]]]:
    """(markdown, csv rows) in the paper's layout; every value column with the paper's value beside."""
    spec = plan.spec

    def ours(entry: dict, column: str) -> str:
        if column == "avg_tokens":
            return "–" if entry["avg_tokens"] is None else f"{100 * entry['avg_tokens']:.0f}%"
        if column == "rel_avg":
            return "–" if entry["rel_avg"] is None else f"{entry['rel_avg']:.1f}%"
        return _cell_text(entry["cells"][column])

    lines = [f"# {spec.title}", ""] + [f"- {k}: {v}" for k, v in provenance.items()] + [""]
    if spec.transposed:  # Tab. 6: a row per benchmark, a column per setting
        settings = [r.key[0] for r in spec.rows]
        header = ["benchmark", *[f"{s} (ours)" for s in settings], *[f"{s} (paper)" for s in settings]]
        md_header = ["benchmark", *settings]
        body, md_body = [], []
        for bench in spec.benchmarks:
            values = [_cell_text(e["cells"][bench]) for e in collected]
            papers = [_paper_value(spec, i, bench) for i in range(len(collected))]
            body.append([bench, *values, *papers])
            md_body.append([bench, *[f"{v}<br>paper {p}" for v, p in zip(values, papers)]])
        md_body.append(["Avg. tokens", *[ours(e, "avg_tokens") for e in collected]])
        body.append(["Avg. tokens", *[ours(e, "avg_tokens") for e in collected], *[""] * len(collected)])
    else:
        columns = ["avg_tokens", *[c for c in spec.columns if c not in ("avg_tokens", "rel_avg")], "rel_avg"]
        header = [*spec.keys, "ours: model", *[x for c in columns for x in (c, f"{c} (paper)")]]
        md_header = [*spec.keys, *columns]
        body, md_body = [], []
        for i, entry in enumerate(collected):
            values = [ours(entry, c) for c in columns]
            papers = [_paper_value(spec, i, c) or "–" for c in columns]
            body.append([*entry["row"].key, entry["model"] or "", *[x for v, p in zip(values, papers) for x in (v, p)]])
            md_body.append([*entry["row"].key, *[f"{v}<br>paper {p}" for v, p in zip(values, papers)]])
    lines += ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    lines += ["| " + " | ".join(r) + " |" for r in md_body]
    return "\n".join(lines) + "\n", [header, *body]


def provenance(plan: Plan, collected: list[dict], argv: list[str], per_split: int | None, bench: dict | None) -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    counts = sorted({c.n for e in collected for c in e["cells"].values() if c.n is not None})
    settings = "; ".join(f"{' | '.join(r.key)} = {r.method} [{_params_text(r.method)}]" for r in plan.spec.rows if r.method)
    info = {
        "command": "python scripts/reproduce_table.py " + shlex.join(argv),
        "commit": (commit or "unknown") + (" (with uncommitted changes)" if dirty else ""),
        "models": "; ".join(f"{label} → {model or 'not run'}" for label, model in plan.models.items()),
        "data": (f"embedded default: synthetic RefCOCO-format splits, {per_split} pictures each (ivcp data "
                 f"make-grounding), in {plan.lmudata}" if plan.embedded else f"$LMUData = {plan.lmudata}"),
        "protocol": f"{DEFAULT_PROTOCOL} prompts (configs/eval.toml [prompts]); grounding scored with the authors' "
                    "strict Acc@0.5; each cell ± the standard error 100·sqrt(p(1−p)/n) over its n pictures",
        "n per cell": ", ".join(map(str, counts)) if counts else "no cell has a result yet",
        "rows (harness entry [ivcp method(options on top of configs/models)])": settings,
        "Avg. tokens": "visual KV kept, mean over the row's answered samples and benchmarks (ivcp_stats)",
        "Rel. Avg.": "mean over the row's benchmarks of score / the same model's vanilla score (– without a vanilla row)",
        "harness": f"VLMEvalKit/run.py --reuse, work dir {plan.work}",
        "software": f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.platform()}, "
                    f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    }
    if bench:
        info["efficiency"] = ("ivcp bench (median of 5; KV of the prompt's visual tokens; the ratio to vanilla in "
                              "brackets): " + next(iter(bench.values()))["_command"])
    return info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=int, required=True)
    parser.add_argument("--models", default="", help="comma list of MODEL or 'PAPER LABEL=MODEL'")
    parser.add_argument("--data", default="", help="comma list: run only these benchmarks of the table")
    parser.add_argument("--per-split", type=int, default=None,
                        help=f"embedded default: pictures per synthetic split (default {DEFAULT_PER_SPLIT})")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--work-dir", default=os.environ.get("IVCP_WORK_DIR", "outputs"))
    parser.add_argument("--out", default="", help="where table_N.md / .csv go (default <work dir>/tables)")
    parser.add_argument("--list", action="store_true", help="print the table's rows, columns and settings; run nothing")
    args = parser.parse_args(argv)
    try:
        spec = table_spec(args.table)
        if args.list:
            print(json.dumps(listing(spec), indent=1, ensure_ascii=False))
            return 0
        embedded = not os.environ.get("LMUData")
        if args.per_split is not None and not embedded:
            raise ValueError("--per-split sizes the embedded default's synthetic splits; with $LMUData set the "
                             "TSVs are used whole")
        per_split = (args.per_split or DEFAULT_PER_SPLIT) if embedded else None
        if per_split is not None and per_split < 1:
            raise ValueError(f"--per-split must be positive, got {per_split}")
        work_root = Path(args.work_dir).resolve()
        lmudata = work_root / f"embedded-k{per_split}" / "lmudata" if embedded else Path(os.environ["LMUData"])
        work = (work_root / f"embedded-k{per_split}" if embedded else work_root) / "vlmeval"
        data = [d for d in args.data.split(",") if d]
        unknown = [d for d in data if d not in spec.benchmarks]
        if unknown:
            raise ValueError(f"--data {', '.join(unknown)}: not a benchmark of table {spec.number} "
                             f"({', '.join(spec.benchmarks)})")
        if args.nproc < 1:
            raise ValueError(f"--nproc must be a positive integer, got {args.nproc}")
        if args.nproc > 1:  # without GPUs the ranks run on the CPU over gloo (VLMEvalKit/run.py); with GPUs, one each
            import torch
            if 0 < torch.cuda.device_count() < args.nproc:
                raise ValueError(f"--nproc {args.nproc} needs {args.nproc} GPUs (one per rank); "
                                 f"this machine has {torch.cuda.device_count()}")
        models = model_plan(spec, [m.strip() for m in args.models.split(",") if m.strip()], embedded)
        plan = Plan(spec, models, embedded, data, lmudata, work).build()
        for model, method in dict.fromkeys((plan.models[r.paper_model], r.method) for i, r in enumerate(spec.rows)
                                           if any((i, b) in plan.runs for b in spec.benchmarks)):
            check_method(model, method)  # before any inference
    except ValueError as error:
        print(f"reproduce_table: error: {error}", file=sys.stderr)
        return 2
    status = 0
    if plan.runs:
        if embedded:
            make_embedded_data(lmudata, per_split)
        status = 1 if launch(plan, args.nproc) != 0 else 0
    bench = run_bench(plan, work.parent) if spec.number == 3 else None
    collected = collect(plan, bench)
    info = provenance(plan, collected, argv, per_split, bench)
    markdown, table = render(plan, collected, info)
    out = Path(args.out) if args.out else work_root / "tables"
    print(markdown)
    for path in results.write(markdown, table, out, f"table_{spec.number}"):
        print(f"wrote {path}")
    missing = [f"{' | '.join(e['row'].key)} x {b}" for e in collected for b, c in e["cells"].items()
               if c.note.startswith("MISSING")]
    if missing:
        print(f"reproduce_table: {len(missing)} cell(s) without the result they should have:", file=sys.stderr)
        for line in missing:
            print(f"  MISSING {line}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
