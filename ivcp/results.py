"""Result tables in the paper's layout, from VLMEvalKit output folders (no VLMEvalKit import).

- Tab. 1 (grounding): a row per method: Average Tokens, Acc@0.5 per split ± its standard error and the
  number of pictures n (the authors' strict metric; the lenient parse in a second table where it
  differs), Rel. Avg.
- Tab. 2 (general VQA): a row per method: Average Tokens, the benchmark's primary score, Rel. Avg.
Rel. Avg. = mean over benchmarks of (method score / vanilla score), in percent; a benchmark where
vanilla scored 0 is left out of it. Average Tokens = mean retained share of visual KV over the
answered samples, from the run's per-sample statistics (``<work dir>/ivcp_stats``). Each table
carries how it was made (models, methods, prompt protocol, date, machine) and, when given, the
paper's row beside ours with the difference. A missing result is shown as "–" and listed.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import platform
from pathlib import Path

from .eval import rundata, stats
from .eval.grounding import GROUNDING_SPLITS
from .eval.protocol import DEFAULT_PROTOCOL, METHODS, MODELS, run_name

# from configs/eval.toml: method name (ivcp) → the paper's label
PAPER_LABEL = {name: entry["paper_label"] for name, entry in METHODS.items() if "paper_label" in entry}
GENERAL_VQA = ("SEEDBench_IMG", "MMBench_DEV_EN_V11", "MMStar", "RealWorldQA", "MME", "POPE", "HallusionBench",
               "TextVQA_VAL", "AI2D_TEST")


def model_name(base: str, method: str, protocol: str = DEFAULT_PROTOCOL) -> str:
    """The VLMEvalKit model name of ``base`` run with ``method`` under a prompt ``protocol``."""
    return run_name(base, method, protocol)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def grounding_score(work_dir: Path, model: str, split: str, metric: str = "paper") -> float | None:
    """Acc@0.5 of one model on one split from ivcp's score file: ``paper`` (the authors' strict
    metric) or ``lenient``."""
    path = Path(work_dir) / model / f"{model}_{split}_acc.csv"
    if not path.is_file():
        return None
    row = _read_csv(path)[0]
    value = row.get("Acc@0.5" if metric == "paper" else "Acc@0.5 lenient")
    return _number(value)


def grounding_count(work_dir: Path, model: str, split: str) -> int | None:
    """How many pictures the score of one model on one split is over (the score file's ``n``)."""
    path = Path(work_dir) / model / f"{model}_{split}_acc.csv"
    if not path.is_file():
        return None
    value = _number(_read_csv(path)[0].get("n"))
    return None if value is None else int(value)


def standard_error(percent: float | None, n: int | None) -> float | None:
    """Standard error of an accuracy over ``n`` independent pictures, in points:
    100 · sqrt(p (1 − p) / n) with p = percent / 100 (None without a score or a count)."""
    if percent is None or not n:
        return None
    p = percent / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / n)


def format_score(value: float | None, n: int | None = None, digits: int = 1) -> str:
    """A table cell: "81.0 ± 2.8 (n=200)" when the count is known, the bare score otherwise."""
    if value is None:
        return "–"
    se = standard_error(value, n)
    return f"{value:.{digits}f}" if se is None else f"{value:.{digits}f} ± {se:.{digits}f} (n={n})"


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def general_score(work_dir: Path, model: str, dataset: str) -> float | None:
    """The primary score VLMEvalKit wrote for a general benchmark (our reading of its score files):
    the "Overall" entry of ``*_acc.csv`` / ``*_score.csv`` (json too); MME: perception + reasoning;
    HallusionBench: the mean of aAcc, fAcc and qAcc."""
    folder = Path(work_dir) / model
    for suffix in ("_acc.csv", "_score.csv", "_acc.json", "_score.json"):
        path = folder / f"{model}_{dataset}{suffix}"
        if not path.is_file():
            continue
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            rows = [data] if isinstance(data, dict) else data
        else:
            rows = _read_csv(path)
        flat: dict[str, float] = {}
        for row in rows:
            label = next((str(v) for v in row.values() if _number(v) is None), None)
            for key, value in row.items():
                number = _number(value)
                if number is not None:
                    flat.setdefault(key, number)
                    if label is not None:
                        flat.setdefault(f"{label}/{key}", number)
        if dataset == "MME" and {"perception", "reasoning"} <= set(flat):
            return flat["perception"] + flat["reasoning"]
        if dataset == "HallusionBench":
            parts = [v for k, v in flat.items() if k.split("/")[-1] in ("aAcc", "fAcc", "qAcc") and k.startswith("Overall")]
            if len(parts) == 3:
                return sum(parts) / 3
        for key in ("Overall", "overall"):
            if key in flat:
                return flat[key]
            matches = [v for k, v in flat.items() if k.startswith(f"{key}/")]
            if matches:
                return matches[0]
    return None


def cell_problem(work_dir: Path, model: str, bench: str, current: dict | None) -> str:
    """Why a cell's score file must not be shown ("" when it may): its prediction file is missing or
    damaged (a killed write), or the predictions answer other data than the current file
    (``current``: :func:`ivcp.eval.rundata.identity`)."""
    predictions = rundata.prediction_file(work_dir, model, bench)
    if predictions is None:
        return "no prediction file"
    if not rundata.readable_predictions(predictions):
        return f"{predictions} cannot be read (cut short by a killed run?): rerun the script to make it again"
    recorded = rundata.read_manifest(work_dir, model, bench)
    if current is not None and recorded is not None and recorded["sha256"] != current["sha256"]:
        return (f"its predictions answer {recorded.get('file')} (sha256 {recorded['sha256'][:12]}…), not the current "
                f"{current['file']} (sha256 {current['sha256'][:12]}…)")
    return ""


def build_table(work_dir: str | Path, base_model: str, methods: list[str], benchmarks: list[str], kind: str,
                protocol: str = DEFAULT_PROTOCOL, metric: str = "paper", lmudata: str | Path | None = None) -> list[dict]:
    """Rows (dicts) of a table; scores None when a run is missing, damaged, stale or made on other
    data than ``lmudata``'s files (the reason in ``row["why"]``). Average Tokens from the run's
    statistics (``<work_dir>/ivcp_stats``) over the samples of each prediction file; "unknown" (None)
    when any scored benchmark lacks them. ``row["data"]``: each cell's recorded data file and hash."""
    if kind not in ("grounding", "general"):
        raise ValueError(f"table kind must be grounding or general, got {kind!r}")
    if base_model not in MODELS:
        raise ValueError(f"unknown model {base_model!r}; ivcp's models: {', '.join(MODELS)}")
    work_dir = Path(work_dir)
    current = {b: rundata.identity(b, lmudata) if lmudata else None for b in benchmarks}
    rows = []
    for method in methods:
        name = model_name(base_model, method, protocol)
        scores, shares, why, data, counts = {}, [], {}, {}, {}
        for bench in benchmarks:
            data[bench] = rundata.read_manifest(work_dir, name, bench)
            problem = cell_problem(work_dir, name, bench, current[bench])
            if problem:
                scores[bench], why[bench] = None, problem
                continue
            if kind == "grounding":
                scores[bench] = grounding_score(work_dir, name, bench, metric)
                counts[bench] = grounding_count(work_dir, name, bench)
            else:
                scores[bench] = general_score(work_dir, name, bench)
            indices = rundata.answered_indices(rundata.prediction_file(work_dir, name, bench))
            share = stats.average_share(name, bench, indices, root=work_dir / "ivcp_stats")
            if scores[bench] is not None:
                shares.append(share)
        known = bool(shares) and all(share is not None for share in shares)
        rows.append({"method": method, "model": name, "avg_tokens": sum(shares) / len(shares) if known else None,
                     "scores": scores, "why": why, "data": data, "n": counts})
    vanilla = next((r for r in rows if r["method"] == "vanilla"), None)
    for row in rows:
        row["rel_avg"] = relative_average(row["scores"], vanilla["scores"]) if vanilla else None
    return rows


def budget_note(rows: list[dict], tolerance: float = 0.05) -> str:
    """Which methods of a table ran at matched budgets: groups whose Average Tokens (visual KV kept)
    lie within ``tolerance`` of the group's first, the share of each, and what that means for reading."""
    pruned = sorted((r["avg_tokens"], r["method"]) for r in rows if r["method"] != "vanilla" and r["avg_tokens"] is not None)
    groups: list[list[tuple[float, str]]] = []
    for share, method in pruned:
        if groups and share - groups[-1][0][0] <= tolerance:
            groups[-1].append((share, method))
        else:
            groups.append([(share, method)])
    if not groups:
        return "no pruned method has Average Tokens yet"
    text = "; ".join(" ≈ ".join(f"{m} {100 * s:.0f}%" for s, m in g) for g in groups)
    return (f"visual KV kept (Average Tokens): {text}. Methods joined by ≈ ran at matched budgets (within "
            f"{100 * tolerance:.0f} points); compare accuracy across groups only with the budget in mind")


def same_scores(a: list[dict], b: list[dict]) -> bool:
    """Whether two tables of the same rows hold the same score in every cell (e.g. strict and lenient)."""
    return all(x["scores"] == y["scores"] for x, y in zip(a, b)) and len(a) == len(b)


def missing_results(rows: list[dict]) -> list[str]:
    """"model x benchmark" (and why, when known) for every cell without a result."""
    return [f"{row['model']} x {bench}" + (f": {row.get('why', {})[bench]}" if bench in row.get("why", {}) else "")
            for row in rows for bench, score in row["scores"].items() if score is None]


def data_provenance(rows: list[dict], benchmarks: list[str], lmudata: str | Path | None = None) -> dict:
    """The table's data: per benchmark, the file(s) and sha256 its cells' predictions answer (from
    the work dir's records; "not recorded" for outputs made without ``VLMEvalKit/run.py``)."""
    info = {"LMUData": str(lmudata) if lmudata else "not given"}
    for bench in benchmarks:
        seen = []
        for row in rows:
            entry = row.get("data", {}).get(bench)
            label = f"{entry.get('file')} (sha256 {entry['sha256']})" if entry else "not recorded"
            if row["scores"].get(bench) is not None and label not in seen:
                seen.append(label)
        info[f"data {bench}"] = "; ".join(seen) if seen else "–"
    return info


def relative_average(scores: dict[str, float | None], reference: dict[str, float | None]) -> float | None:
    """Mean over benchmarks of score / reference, in percent (benchmarks missing or with a 0 reference skipped)."""
    ratios = [scores[b] / reference[b] for b in scores
              if scores.get(b) is not None and reference.get(b) not in (None, 0)]
    return 100.0 * sum(ratios) / len(ratios) if ratios else None


def paper_rows(path: str | Path, paper_model: str = "") -> dict[str, dict]:
    """The paper's rows for one model, keyed by the paper's method label; in a table of budgets (no
    ``model`` column, e.g. Tab. 16: avg_tokens "192 (33.3%)") keyed "<label>:<percent>" ("FastV:33")."""
    rows = _read_csv(Path(path))
    if rows and "model" not in rows[0]:
        keyed = {}
        for r in rows:
            percent = r.get("avg_tokens", "").partition("(")[2].split(".")[0].rstrip("%)")
            keyed[f"{r['method']}:{percent}" if percent and r["method"] != "Vanilla" else r["method"]] = r
        return keyed
    return {r["method"]: r for r in rows if r["model"] == paper_model}


def paper_keys(method: str) -> list[str]:
    """How the paper's rows may name one of our methods ("fastv:Keep33" -> ["FastV:33"])."""
    entry, _, budget = method.partition(":")
    labels = PAPER_LABEL.get(entry, [])
    labels = [labels] if isinstance(labels, str) else labels
    return [f"{label}:{budget.removeprefix('Keep')}" if budget else label for label in labels]


def _fmt(value: float | None, digits: int = 1, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{'%' if percent else ''}"


def render(rows: list[dict], benchmarks: list[str], title: str, provenance: dict, paper: dict[str, dict] | None = None
           ) -> tuple[str, list[list[str]]]:
    """(markdown, csv rows) of a table; with ``paper``, each method gets a paper row and a Δ row."""
    header = ["Method", "Avg. tokens", *benchmarks, "Rel. Avg."]
    table = [header]
    for row in rows:
        share = None if row["avg_tokens"] is None else 100 * row["avg_tokens"]
        counts = row.get("n", {})
        table.append([row["method"], _fmt(share, 0, True), *[format_score(row["scores"][b], counts.get(b)) for b in benchmarks],
                      _fmt(row["rel_avg"], 1, True)])
        theirs = next((paper[k] for k in paper_keys(row["method"]) if k in (paper or {})), None)
        if theirs:
            table.append([f"  paper: {theirs['method']}", theirs.get("avg_tokens", ""),
                          *[theirs.get(b, "") for b in benchmarks], theirs.get("rel_avg", "")])
            deltas = []
            for b in benchmarks:
                ours, published = row["scores"][b], _number(str(theirs.get(b, "")).rstrip("%"))
                deltas.append("–" if ours is None or published is None else f"{ours - published:+.1f}")
            table.append(["  Δ ours − paper", "", *deltas, ""])
    lines = [f"# {title}", "", *(f"- {k}: {v}" for k, v in provenance.items()), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    return "\n".join(lines) + "\n", table


def provenance(base_model: str, methods: list[str], work_dir: str | Path, note: str = "",
               protocol: str = DEFAULT_PROTOCOL) -> dict:
    import torch

    settings = [f"{m}({', '.join(f'{k}={v}' for k, v in METHODS.get(m, {}).get('params', {}).items())})"
                if METHODS.get(m, {}).get("params") else m for m in methods]
    info = {"model": base_model, "methods": ", ".join(settings) + " (other parameters: configs/models/)",
            "prompts": f"{protocol} protocol (configs/eval.toml [prompts])",
            "VLMEvalKit outputs": str(work_dir),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.platform()}, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"}
    if note:
        info["note"] = note
    return info


def write(markdown: str, table: list[list[str]], out: str | Path, stem: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(markdown)
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(table)
    return [md, csv_path]


def paper_model_label(base_model: str) -> str:
    """The paper's name for a model ("" when the paper has no row for it)."""
    entry = MODELS.get(base_model)
    return entry.paper_label if entry is not None else ""


def default_benchmarks(kind: str) -> list[str]:
    return list(GROUNDING_SPLITS if kind == "grounding" else GENERAL_VQA)
