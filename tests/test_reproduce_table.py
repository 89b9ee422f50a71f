"""scripts/reproduce_table.py: the paper's tables, one command each (the list, the refusal before
inference, the standard error, one table end to end on the tiny grounder and its resumed run)."""

import csv
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

from ivcp import results
from ivcp.eval.protocol import run_name

ROOT = Path(__file__).resolve().parent.parent
TABLES = (1, 2, 3, 4, 5, 6, 7, 11, 16, 17)
spec = importlib.util.spec_from_file_location("reproduce_table", ROOT / "scripts" / "reproduce_table.py")
reproduce = importlib.util.module_from_spec(spec)
sys.modules["reproduce_table"] = reproduce  # dataclasses look their module up
spec.loader.exec_module(reproduce)


def _paper(number):
    path = next((ROOT / "results" / "paper").glob(f"table{number}_*.csv"))
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, list(reader)


def _listing(number, capsys):
    assert reproduce.main(["--table", str(number), "--list"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("number", TABLES)
def test_list_equals_the_papers_rows_and_columns(number, capsys):
    listed = _listing(number, capsys)
    header, rows = _paper(number)
    if number == 6:  # printed transposed: a row per benchmark, a column per setting
        assert listed["rows"] == [r[0] for r in rows] and listed["columns"] == header[1:]
    else:
        keys = len(listed["keys"])
        assert header[:keys] == listed["keys"]
        assert listed["rows"] == [" | ".join(r[:keys]) for r in rows]
        assert listed["columns"] == header[keys:]
    # every row runs a registered harness name, or says why no harness setting exists
    for setting in listed["settings"]:
        if setting["method"].startswith("–"):
            assert number == 16 and setting["row"].startswith("PDrop"), setting
        else:
            run_name("Qwen2.5-VL-TinyGrounder", setting["method"])


def test_the_rows_run_the_papers_settings(capsys):
    by_row = {s["row"]: s for s in _listing(4, capsys)["settings"]}
    assert by_row["IVC-Prune | w/o IVC"]["params"] == "ivc_prune(pattern=none)"
    assert by_row["FastV | w/ IVC"]["params"] == "ivc_union(base=fastv)"
    assert by_row["Vanilla | w/o IVC"]["params"] == "drop_ivc"
    by_row = {s["row"]: s for s in _listing(17, capsys)["settings"]}
    assert [by_row[r]["params"] for r in ("5%", "10%", "20%")] == [
        "ivc_prune(ivc_ratio=0.05)", "ivc_prune", "ivc_prune(ivc_ratio=0.2)"]
    by_row = {s["row"]: s for s in _listing(16, capsys)["settings"]}
    assert by_row["IVC-Prune | 64 (11.1%)"]["params"] == "ivc_prune(keep_ratio=0.1111)"
    assert by_row["PDrop | 128 (22.2%)"]["method"] == "pdrop:Keep22"


@pytest.mark.parametrize("budget,share", [("Keep33", 192 / 576), ("Keep22", 128 / 576), ("Keep11", 64 / 576)])
def test_pdrops_budgets_keep_their_share_of_llavas_visual_kv(budget, share):
    """PDrop has no keep ratio: its Tab. 16 rows run its stages at the budget. Counted layer by layer on
    LLaVA-1.5-7B (32 layers; before the first stage layer every visual token, from each stage layer on
    lambda of those left), the visual KV kept averages the budget (192 / 128 / 64 of 576)."""
    from ivcp.eval.protocol import parse_run_name

    run = parse_run_name(run_name("llava-1.5-7b-hf", f"pdrop:{budget}"))
    assert run.method == "pdrop"
    layers, ratios = run.method_params["stage_layers"], run.method_params["stage_ratios"]
    kept = [math.prod(r for stage, r in zip(layers, ratios) if layer >= stage) for layer in range(32)]
    assert sum(kept) / 32 == pytest.approx(share, abs=0.002)
    reproduce.check_method("llava-1.5-7b-hf", f"pdrop:{budget}")  # a setting that exists: not refused


def test_standard_error_by_hand():
    # p = 0.9 over n = 100 pictures: sqrt(0.9 · 0.1 / 100) = 0.03 → 3.0 points
    assert results.standard_error(90.0, 100) == pytest.approx(3.0)
    assert results.format_score(90.0, 100) == "90.0 ± 3.0 (n=100)"
    # p = 0.5 over 4: sqrt(0.25 / 4) = 0.25 → 25 points; all right or all wrong: 0
    assert results.standard_error(50.0, 4) == pytest.approx(25.0)
    assert results.standard_error(100.0, 7) == 0.0 and results.standard_error(None, 7) is None
    assert results.format_score(81.0, None) == "81.0"


def test_an_impossible_option_or_family_is_refused_before_inference(tmp_path, monkeypatch, capsys):
    def no_inference(*args, **kwargs):
        raise AssertionError("inference started")

    monkeypatch.setattr(reproduce, "launch", no_inference)
    monkeypatch.setattr(reproduce, "make_embedded_data", no_inference)
    monkeypatch.delenv("LMUData", raising=False)
    # an option that does not exist: a harness entry asking IVC-Prune for a pattern it does not have
    monkeypatch.setitem(reproduce.METHODS, "ivc_prune_hexagon",
                        {"suffix": "_IVCPHexagon", "method": "ivc_prune", "params": {"pattern": "hexagon"}})
    monkeypatch.setitem(reproduce.TABLE17, "10%", "ivc_prune_hexagon")
    code = reproduce.main(["--table", "17", "--work-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "ivc_prune_hexagon" in err and "got 'hexagon'" in err, err
    monkeypatch.setitem(reproduce.TABLE17, "10%", "ivc_prune")
    # a method the family cannot run: LLaVA's adapter without access to its vision tower cannot run VScan
    from ivcp.adapters.base import ModelAdapter
    from ivcp.adapters.llava import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "vision_attention_module", ModelAdapter.vision_attention_module)
    monkeypatch.setattr(LlavaAdapter, "vision_depth", ModelAdapter.vision_depth)
    reproduce._FAMILY_PROBES.clear()
    code = reproduce.main(["--table", "1", "--models", "Qwen2.5-VL 7B=llava-1.5-Tiny", "--work-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "vscan" in err and "llava-1.5-Tiny" in err and "vision-tower access" in err, err
    assert not (tmp_path / "embedded-k50").exists()
    # bad arguments: one line naming the problem, nothing run
    for argv, message in ((["--table", "8"], "no table 8"), (["--table", "17", "--data", "MME"], "--data MME"),
                          (["--table", "1", "--models", "Qwen9-VL"], "unknown model 'Qwen9-VL'"),
                          (["--table", "7", "--models", "Qwen2.5-VL 7B=Qwen2.5-VL-Tiny"], "no model 'Qwen2.5-VL 7B'")):
        assert reproduce.main([*argv, "--work-dir", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err, argv
    assert reproduce.main(["--table", "17", "--nproc", "0", "--work-dir", str(tmp_path)]) == 2
    assert "--nproc must be a positive integer, got 0" in capsys.readouterr().err


def test_a_table_end_to_end_on_the_tiny_grounder_and_resumed(tmp_path, capsys):
    """Table 17 on the embedded default (2 pictures per split): every cell filled (ours ± SE with n, or
    what it needs), the paper's values as published, and a rerun reuses everything: the same table."""
    env = {k: v for k, v in os.environ.items() if k != "LMUData"}
    args = ["--table", "17", "--per-split", "2", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "t")]
    import subprocess

    first = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce_table.py"), *args], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    table = list(csv.DictReader(open(tmp_path / "t" / "table_17.csv", newline="", encoding="utf-8")))
    header, paper = _paper(17)
    assert [r["ivc_ratio"] for r in table] == [r[0] for r in paper]
    for ours, published in zip(table, paper):
        assert ours["ours: model"] == "Qwen2.5-VL-TinyGrounder"
        for column, value in zip(header[1:], published[1:]):
            assert ours[f"{column} (paper)"] == value  # the paper's value, as printed
            if column.startswith("RefCOCO"):
                score, _, rest = ours[column].partition(" ± ")
                se, _, n = rest.partition(" (n=")
                assert n == "2)" and 0 <= float(score) <= 100
                p = float(score) / 100
                assert float(se) == pytest.approx(100 * math.sqrt(p * (1 - p) / 2), abs=0.06)
            else:
                assert ours[column] == f"needs {column}"
        assert ours["avg_tokens"].endswith("%")  # visual KV kept, from the run's statistics
    markdown = (tmp_path / "t" / "table_17.md").read_text()
    for line in ("- command: python scripts/reproduce_table.py --table 17 --per-split 2", "- commit: ",
                 "- models: Qwen2.5-VL 7B → Qwen2.5-VL-TinyGrounder", "- n per cell: 2", "- protocol: authors"):
        assert line in markdown
    # each answered sample appends one line of statistics: a resumed run that answers nothing appends none
    before = {p: p.read_text() for p in (tmp_path / "work").rglob("ivcp_stats/*/*.jsonl")}
    resumed = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce_table.py"), *args], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "t" / "table_17.md").read_text() == markdown
    assert list(csv.DictReader(open(tmp_path / "t" / "table_17.csv", newline="", encoding="utf-8"))) == table
    assert "Infer Qwen2.5-VL-TinyGrounder" not in resumed.stdout + resumed.stderr  # nothing answered again
    assert len(before) == 6 and all(p.read_text() == text for p, text in before.items())


def test_table17s_ivc_shares_reach_the_method_and_change_what_is_kept():
    """Tab. 17's rows differ by ivc_ratio alone: each reaches IVC-Prune and changes the kept set. On the
    tiny grounder's 8 x 8 grid (64 visual tokens) the IVC set is the top round(r * 64) by V united with the
    top round(r * 64) by U: at most 6, 12, 26 tokens; the 50 % budget (32) is then filled by foreground."""
    import random

    import torch

    import ivcp
    from ivcp.data.grounding import make_sample
    from ivcp.eval.grounding import grounding_prompt
    from ivcp.eval.protocol import parse_run_name
    from ivcp.testing import tiny_grounder

    model, processor = tiny_grounder()
    rows = {r: parse_run_name(run_name("Qwen2.5-VL-TinyGrounder", reproduce.TABLE17[r])) for r in ("5%", "10%", "20%")}
    assert {r: run.method_params.get("ivc_ratio") for r, run in rows.items()} == {"5%": 0.05, "10%": None, "20%": 0.2}
    for seed in range(3):
        sample = make_sample(random.Random(seed))
        messages = [{"role": "user", "content": [{"type": "image", "image": sample["image"]},
                                                 {"type": "text", "text": grounding_prompt(sample["expression"])}]}]
        inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
        kept, ivc = {}, {}
        for r, run in rows.items():
            with ivcp.prune(model, run.method, **run.method_params) as session, torch.no_grad():
                model(**inputs)
            record = session.last
            assert record.n_visual == 64 and record.n_visual_kept == 32
            kept[r], ivc[r] = set(record.kept.tolist()), set(record.marks["ivc"].tolist())
        assert len(ivc["5%"]) <= 6 and len(ivc["10%"]) <= 12 and len(ivc["20%"]) <= 26
        assert len(ivc["5%"]) < len(ivc["10%"]) < len(ivc["20%"])
        assert all(ivc[r] <= kept[r] for r in rows)  # the IVC tokens are always kept
        assert kept["5%"] != kept["10%"] != kept["20%"]
