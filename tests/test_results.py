"""Result collection on hand-built VLMEvalKit output folders (no VLMEvalKit needed)."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ivcp import results
from ivcp.eval import stats

ROOT = Path(__file__).resolve().parent.parent


def _predictions(work, model, bench, indices=(0, 1)):
    """VLMEvalKit's prediction file of a model x benchmark (as a .tsv: one of its formats)."""
    folder = work / model
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["index\tprediction"] + [f"{i}\tanswer {i}" for i in indices]
    (folder / f"{model}_{bench}.tsv").write_text("\n".join(lines) + "\n")


def _score_file(work, model, split, acc, share, lenient=None):
    """ivcp's grounding score file, the predictions and the run's per-sample statistics (two samples,
    mean ``share``)."""
    folder = work / model
    _predictions(work, model, split)
    with open(folder / f"{model}_{split}_acc.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "Acc@0.5", "Acc@0.5 lenient", "n", "avg_tokens"])
        writer.writerow([split, acc, acc if lenient is None else lenient, 10, share])
    for index, value in enumerate((share - 0.01, share + 0.01)):
        stats.record(model, split, index, {"visual_kv_share": value}, root=work / "ivcp_stats")


def test_grounding_table_and_relative_average(tmp_path):
    base = "Qwen2.5-VL-7B-Instruct"
    _score_file(tmp_path, base, "RefCOCO_testA", 90.0, 1.0)
    _score_file(tmp_path, base, "RefCOCO_val", 80.0, 1.0)
    _score_file(tmp_path, base + "_IVCP", "RefCOCO_testA", 81.0, 0.5)
    _score_file(tmp_path, base + "_IVCP", "RefCOCO_val", 80.0, 0.52)
    _score_file(tmp_path, base + "_FastV", "RefCOCO_testA", 45.0, 0.54)  # RefCOCO_val run missing
    rows = results.build_table(tmp_path, base, ["vanilla", "ivc_prune", "fastv"], ["RefCOCO_testA", "RefCOCO_val"],
                               "grounding")
    by = {r["method"]: r for r in rows}
    # (81/90 + 80/80) / 2 = (0.9 + 1.0) / 2 = 95 %
    assert by["ivc_prune"]["rel_avg"] == pytest.approx(95.0)
    assert by["ivc_prune"]["avg_tokens"] == pytest.approx(0.51)
    assert by["vanilla"]["rel_avg"] == pytest.approx(100.0)
    # a missing run is shown as missing and left out of the average: 45/90 = 50 %
    assert by["fastv"]["scores"]["RefCOCO_val"] is None and by["fastv"]["rel_avg"] == pytest.approx(50.0)
    paper = results.paper_rows(ROOT / "results/paper/table1_grounding.csv", "Qwen2.5-VL 7B")
    markdown, table = results.render(rows, ["RefCOCO_testA", "RefCOCO_val"], "t", {"model": base}, paper)
    # ± the standard error over the n = 10 pictures of the score file: 100·sqrt(0.81·0.19/10) = 12.4,
    # 100·sqrt(0.8·0.2/10) = 12.6
    assert "| ivc_prune | 51% | 81.0 ± 12.4 (n=10) | 80.0 ± 12.6 (n=10) | 95.0% |" in markdown
    paper_ivc = next(r for r in table if r[0] == "  paper: IVC-Prune")
    delta = table[table.index(paper_ivc) + 1]
    assert delta[2] == f"{81.0 - float(paper_ivc[2]):+.1f}"


def test_relative_average_skips_zero_references():
    assert results.relative_average({"a": 5.0, "b": 3.0}, {"a": 0.0, "b": 6.0}) == pytest.approx(50.0)
    assert results.relative_average({"a": 5.0}, {"a": 0.0}) is None


def test_general_scores_from_vlmevalkit_files(tmp_path):
    model = "M_IVCP"
    folder = tmp_path / model
    folder.mkdir()
    (folder / f"{model}_MMStar_acc.csv").write_text("split,Overall,coarse perception\nnone,0.642,0.7\n")
    (folder / f"{model}_MME_score.csv").write_text("perception,reasoning\n1700.5,610.1\n")
    (folder / f"{model}_HallusionBench_score.csv").write_text(
        "split,aAcc,fAcc,qAcc\nOverall,60.0,30.0,40.0\nVD,1,2,3\n")
    (folder / f"{model}_POPE_score.json").write_text(json.dumps({"Overall": 86.9, "acc": 88.0}))
    for bench in ("MMStar", "MME", "HallusionBench", "POPE", "AI2D_TEST"):
        _predictions(tmp_path, model, bench)
    assert results.general_score(tmp_path, model, "MMStar") == pytest.approx(0.642)
    assert results.general_score(tmp_path, model, "MME") == pytest.approx(2310.6)
    assert results.general_score(tmp_path, model, "HallusionBench") == pytest.approx(130 / 3)
    assert results.general_score(tmp_path, model, "POPE") == pytest.approx(86.9)
    assert results.general_score(tmp_path, model, "AI2D_TEST") is None


def test_collect_script_writes_md_and_csv(tmp_path):
    base = "Qwen2.5-VL-Tiny"
    _score_file(tmp_path / "work", base, "RefCOCO_val", 10.0, 1.0)
    _score_file(tmp_path / "work", base + "_IVCP", "RefCOCO_val", 5.0, 0.5)
    out = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), "--work-dir", str(tmp_path / "work"),
                          "--model", base, "--methods", "vanilla,ivc_prune", "--benchmarks", "RefCOCO_val",
                          "--out", str(tmp_path / "res")], capture_output=True, text=True, check=True).stdout
    assert "| ivc_prune | 50% | 5.0 ± 6.9 (n=10) | 50.0% |" in out  # 100·sqrt(0.05·0.95/10) = 6.9
    # the lenient parse agrees in every cell: said once, its table neither printed nor written
    assert "- lenient parse: the same score as the strict metric in every cell" in out
    assert "Acc@0.5 (lenient parse)" not in out and not (tmp_path / "res" / f"grounding_{base}_lenient.md").exists()
    assert "- budgets: visual KV kept (Average Tokens): ivc_prune 50%." in out
    _score_file(tmp_path / "work", base + "_IVCP", "RefCOCO_val", 5.0, 0.5, lenient=7.0)  # now they differ
    out = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), "--work-dir", str(tmp_path / "work"),
                          "--model", base, "--methods", "vanilla,ivc_prune", "--benchmarks", "RefCOCO_val",
                          "--out", str(tmp_path / "res")], capture_output=True, text=True, check=True).stdout
    assert out.index("strict metric") < out.index("Acc@0.5 (lenient parse)") and "| ivc_prune | 50% | 7.0 ± 8.1 (n=10) |" in out
    rows = list(csv.reader(open(tmp_path / "res" / f"grounding_{base}.csv")))
    assert rows[0] == ["Method", "Avg. tokens", "RefCOCO_val", "Rel. Avg."] and rows[2][0] == "ivc_prune"
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), "--work-dir", str(tmp_path),
                          "--model", base, "--methods", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), "--work-dir",
                              str(tmp_path / "work"), "--model", base, "--methods", "vanilla,fastv", "--benchmarks",
                              "RefCOCO_val", "--out", str(tmp_path / "res2")], capture_output=True, text=True)
    assert missing.returncode == 1 and "MISSING Qwen2.5-VL-Tiny_FastV x RefCOCO_val" in missing.stderr


def test_lenient_table_and_prompt_protocol_names(tmp_path):
    base = "Qwen2.5-VL-7B-Instruct"
    _score_file(tmp_path, base + "_DatasetPrompt", "RefCOCO_val", 80.0, 1.0, lenient=85.0)
    _score_file(tmp_path, base + "_IVCP_DatasetPrompt", "RefCOCO_val", 60.0, 0.5, lenient=68.0)
    rows = results.build_table(tmp_path, base, ["vanilla", "ivc_prune"], ["RefCOCO_val"], "grounding",
                               protocol="dataset", metric="lenient")
    assert [r["scores"]["RefCOCO_val"] for r in rows] == [85.0, 68.0]
    assert rows[1]["rel_avg"] == pytest.approx(100 * 68 / 85)
    assert results.build_table(tmp_path, base, ["vanilla"], ["RefCOCO_val"], "grounding")[0]["scores"] == \
        {"RefCOCO_val": None}  # the authors-protocol run is a different model name


def test_general_average_tokens_come_from_the_statistics(tmp_path):
    model = "Qwen2.5-VL-7B-Instruct_IVCP"
    (tmp_path / model).mkdir()
    (tmp_path / model / f"{model}_MMStar_acc.csv").write_text("split,Overall\nnone,0.6\n")
    _predictions(tmp_path, model, "MMStar", (1, 2))
    for index, share in ((1, 0.4), (2, 0.6), (1, 0.5)):  # index 1 answered twice (a resumed run): the last counts
        stats.record(model, "MMStar", index, {"visual_kv_share": share}, root=tmp_path / "ivcp_stats")
    row = results.build_table(tmp_path, "Qwen2.5-VL-7B-Instruct", ["ivc_prune"], ["MMStar"], "general")[0]
    assert row["avg_tokens"] == pytest.approx(0.55) and row["scores"]["MMStar"] == pytest.approx(0.6)


def test_low_budget_table_next_to_the_papers_table16(tmp_path):
    base = "llava-1.5-7b-hf"
    for method, score in (("vanilla", 60.0), ("fastv:Keep33", 55.0), ("ivc_prune:Keep11", 59.0)):
        model = results.model_name(base, method)
        (tmp_path / model).mkdir()
        (tmp_path / model / f"{model}_MMStar_acc.csv").write_text(f"split,Overall\nnone,{score}\n")
        _predictions(tmp_path, model, "MMStar")
    assert results.model_name(base, "fastv:Keep33") == "llava-1.5-7b-hf_FastV_Keep33"
    with pytest.raises(ValueError, match="unknown budget 'vscan:Keep33'"):  # VScan has no budget setting
        results.model_name(base, "vscan:Keep33")
    rows = results.build_table(tmp_path, base, ["vanilla", "fastv:Keep33", "ivc_prune:Keep11"], ["MMStar"], "general")
    paper = results.paper_rows(ROOT / "results/paper/table16_low_budget_llava_1_5_7b.csv")
    _, table = results.render(rows, ["MMStar"], "t", {}, paper)
    labels = [r[0] for r in table]
    assert labels.index("  paper: FastV") == labels.index("fastv:Keep33") + 1
    fastv_paper = table[labels.index("fastv:Keep33") + 1]
    assert fastv_paper[1] == "192 (33.3%)" and fastv_paper[2] == "33.4"  # the paper's FastV at 192 tokens, MMStar
    ivc_paper = table[labels.index("ivc_prune:Keep11") + 1]
    assert ivc_paper[1] == "64 (11.1%)" and ivc_paper[2] == "33.9"
    assert table[labels.index("ivc_prune:Keep11") + 2][2] == f"{59.0 - 33.9:+.1f}"


def test_average_tokens_unknown_when_a_statistics_line_is_damaged(tmp_path):
    """A damaged statistics line loses its sample: the per-dataset average (over the predictions'
    samples) is unknown, so is the table's — never the mean of the samples that remain."""
    model = "Qwen2.5-VL-7B-Instruct_IVCP"
    for bench in ("MMStar", "POPE"):
        (tmp_path / model).mkdir(exist_ok=True)
        (tmp_path / model / f"{model}_{bench}_acc.csv").write_text("split,Overall\nnone,0.6\n")
        _predictions(tmp_path, model, bench, (0, 1))
        stats.record(model, bench, 0, {"visual_kv_share": 0.5}, root=tmp_path / "ivcp_stats")
        stats.record(model, bench, 1, {"visual_kv_share": 0.5}, root=tmp_path / "ivcp_stats")
    with open(tmp_path / "ivcp_stats" / model / "POPE.jsonl", "w") as handle:
        handle.write('{"index": "0", "visual_kv_share": 0.5}\n{"index": "1", "visual_kv_sh\n')  # sample 1 damaged
    with pytest.warns(UserWarning, match="damaged line 2"):
        assert stats.average_share(model, "POPE", [0, 1], root=tmp_path / "ivcp_stats") is None  # per dataset
        row = results.build_table(tmp_path, "Qwen2.5-VL-7B-Instruct", ["ivc_prune"], ["MMStar", "POPE"], "general")[0]
    assert row["scores"] == {"MMStar": 0.6, "POPE": 0.6} and row["avg_tokens"] is None
    markdown, _ = results.render([dict(row, rel_avg=None)], ["MMStar", "POPE"], "t", {})
    assert "| ivc_prune | – | 0.6 | 0.6 | – |" in markdown


def test_a_truncated_prediction_file_never_leaves_its_old_cell(tmp_path):
    """A prediction .xlsx cut short by a killed write: the cell is missing with the file named, even
    though the score file of an earlier run is still there."""
    pytest.importorskip("openpyxl")
    import pandas as pd

    base = "Qwen2.5-VL-Tiny"
    _score_file(tmp_path, base, "RefCOCO_val", 10.0, 1.0)
    (tmp_path / base / f"{base}_RefCOCO_val.tsv").unlink()
    whole = tmp_path / "whole.xlsx"
    pd.DataFrame({"index": [0, 1], "prediction": ["a", "b"]}).to_excel(whole, index=False)
    assert results.build_table(tmp_path, base, ["vanilla"], ["RefCOCO_val"], "grounding")[0]["scores"] == \
        {"RefCOCO_val": None}  # no prediction file at all
    xlsx = tmp_path / base / f"{base}_RefCOCO_val.xlsx"
    xlsx.write_bytes(whole.read_bytes())
    assert results.build_table(tmp_path, base, ["vanilla"], ["RefCOCO_val"], "grounding")[0]["scores"] == \
        {"RefCOCO_val": 10.0}
    xlsx.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])  # killed mid-write
    row = results.build_table(tmp_path, base, ["vanilla"], ["RefCOCO_val"], "grounding")[0]
    assert row["scores"] == {"RefCOCO_val": None} and str(xlsx) in row["why"]["RefCOCO_val"]
    assert results.missing_results([row]) == [f"{base} x RefCOCO_val: {row['why']['RefCOCO_val']}"]


def test_cells_answering_other_data_are_missing_and_the_table_names_its_data(tmp_path):
    from ivcp.eval import rundata

    base = "Qwen2.5-VL-Tiny"
    lmu = tmp_path / "lmu"
    lmu.mkdir()
    (lmu / "RefCOCO_val.tsv").write_text("old pictures\n")
    old = rundata.identity("RefCOCO_val", lmu)
    assert old["sha256"] == hashlib.sha256(b"old pictures\n").hexdigest() and old["file"] == str(lmu / "RefCOCO_val.tsv")
    for model, acc in ((base, 20.0), (base + "_IVCP", 15.0)):
        _score_file(tmp_path / "work", model, "RefCOCO_val", acc, 1.0)
        rundata.manifest_path(tmp_path / "work", model, "RefCOCO_val").write_text(json.dumps(old))
    rows = results.build_table(tmp_path / "work", base, ["vanilla", "ivc_prune"], ["RefCOCO_val"], "grounding",
                               lmudata=lmu)
    assert [r["scores"]["RefCOCO_val"] for r in rows] == [20.0, 15.0]
    info = results.data_provenance(rows, ["RefCOCO_val"], lmu)
    assert info["data RefCOCO_val"] == f"{lmu / 'RefCOCO_val.tsv'} (sha256 {old['sha256']})"
    (lmu / "RefCOCO_val.tsv").write_text("new pictures\n")  # replaced under the same name and indices
    rows = results.build_table(tmp_path / "work", base, ["vanilla", "ivc_prune"], ["RefCOCO_val"], "grounding",
                               lmudata=lmu)
    assert [r["scores"]["RefCOCO_val"] for r in rows] == [None, None]
    assert "answer" in rows[0]["why"]["RefCOCO_val"] and old["sha256"][:12] in rows[0]["why"]["RefCOCO_val"]
    out = subprocess.run([sys.executable, str(ROOT / "scripts/collect_results.py"), "--work-dir", str(tmp_path / "work"),
                          "--model", base, "--methods", "vanilla", "--benchmarks", "RefCOCO_val", "--lmudata", str(lmu),
                          "--out", str(tmp_path / "res")], capture_output=True, text=True)
    assert out.returncode == 1 and "MISSING Qwen2.5-VL-Tiny x RefCOCO_val: its predictions answer" in out.stderr
    assert f"- LMUData: {lmu}" in out.stdout


def test_budget_note_groups_methods_at_matched_budgets():
    rows = [{"method": m, "avg_tokens": s} for m, s in
            (("vanilla", 1.0), ("fastv", 0.75), ("pdrop", 0.55), ("vscan", 0.49), ("ivc_prune", 0.50), ("random", None))]
    note = results.budget_note(rows)
    # 49 % and 50 % lie within 5 points; 55 % is 6 points from the group's first (49 %), 75 % far from all
    assert note.startswith("visual KV kept (Average Tokens): vscan 49% ≈ ivc_prune 50%; pdrop 55%; fastv 75%.")
    assert "random" not in note and "vanilla" not in note
