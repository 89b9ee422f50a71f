"""The VLMEvalKit plugin against the pip-installed VLMEvalKit: registration, datasets, evaluation,
resuming, and the embedded-default grounding script end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vlmeval = pytest.importorskip("vlmeval", reason="VLMEvalKit is the eval tier (bash scripts/setup.sh without --core)")

import pandas as pd  # noqa: E402

from ivcp import vlmeval_plugin as plugin  # noqa: E402
from ivcp.data.grounding import make_grounding  # noqa: E402
from ivcp.testing import make_image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lmudata(tmp_path, monkeypatch):
    folder = tmp_path / "lmu"
    make_grounding(folder, per_split=12, seed=3)
    monkeypatch.setenv("LMUData", str(folder))
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    return folder


def test_import_ivcp_does_not_import_vlmevalkit():
    code = "import sys, ivcp, ivcp.eval.grounding, ivcp.results; print('vlmeval' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_advertised_name_builds_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("IVCP_STATS_DIR", str(tmp_path / "stats"))
    names = plugin.register()
    from vlmeval.config import supported_VLM

    expected = {base + suffix for base in plugin.BASE_MODELS for suffix in plugin.METHOD_SUFFIXES}
    assert set(names) == expected and expected <= set(supported_VLM)
    for name in ("Qwen2.5-VL-7B-Instruct_IVCP", "Qwen2.5-VL-7B-Instruct_Grounding_IVCP", "Qwen2-VL-7B-Instruct_FastV",
                 "Qwen2.5-VL-32B-Instruct_VScan"):
        assert name in supported_VLM
    image = tmp_path / "picture.png"
    make_image(224, 168).save(image)
    for name in sorted(expected):
        factory = supported_VLM[name]
        family = factory.keywords["family"]
        model = factory.func(**{**factory.keywords, "model_path": f"tiny:{family}"})  # the tiny model stands in
        answer = model.generate([dict(type="image", value=str(image)), dict(type="text", value="Where is it?")],
                                dataset="RefCOCO_val")
        assert isinstance(answer, str)
        stats = json.loads((tmp_path / "stats" / name / "RefCOCO_val.jsonl").read_text().splitlines()[-1])
        kept, total = stats["n_visual_kept"], stats["n_visual"]
        assert total == 48
        assert (kept == total) == (factory.keywords["method"] is None), name


def test_grounding_dataset_reads_splits_and_the_aggregate(lmudata, tmp_path):
    plugin.register()
    from vlmeval.dataset import build_dataset

    dataset = build_dataset("RefCOCO+_testB")
    assert isinstance(dataset, plugin.IVCPGrounding) and len(dataset) == 12
    message = dataset.build_prompt(dataset.data.iloc[0])
    assert message[0]["type"] == "image" and Path(message[0]["value"]).is_file()
    assert message[1]["value"] == f"Locate {dataset.data.iloc[0]['question']} and output the bbox coordinates in JSON format."
    (lmudata / "RefCOCO+_testB.tsv").unlink()  # only the aggregated file left: split by category
    again = build_dataset("RefCOCO+_testB")
    assert len(again) == 12 and list(again.data["question"]) == list(dataset.data["question"])
    for path in lmudata.glob("*.tsv"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="ivcp data make-grounding"):
        plugin.IVCPGrounding(dataset="RefCOCO_val")


def test_evaluate_converts_qwen25_boxes_from_the_resized_frame(lmudata, tmp_path):
    plugin.register()
    dataset = plugin.IVCPGrounding(dataset="RefCOCO_val")
    data = dataset.data.copy()
    predictions = []
    for i, row in data.iterrows():
        w, h = int(row["width"]), int(row["height"])
        rh, rw = plugin.smart_resize(h, w, 28, plugin.MIN_PIXELS, plugin.MAX_PIXELS)
        x1, y1, x2, y2 = (float(row[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        if i % 3 == 0:  # exact box, written in the resized frame as Qwen2.5-VL does
            predictions.append(f'```json\n[{{"bbox_2d": [{x1 * rw / w:.1f}, {y1 * rh / h:.1f}, {x2 * rw / w:.1f}, {y2 * rh / h:.1f}]}}]\n```')
        elif i % 3 == 1:  # far away
            predictions.append('{"bbox_2d": [0, 0, 1, 1]}')
        else:
            predictions.append("no idea")
    data["prediction"] = predictions
    eval_file = tmp_path / "Qwen2.5-VL-7B-Instruct_IVCP_RefCOCO_val.xlsx"
    data.drop(columns=["image"]).to_excel(eval_file, index=False)
    result = dataset.evaluate(str(eval_file))
    assert result["Acc@0.5"].iloc[0] == pytest.approx(100 * 4 / 12)
    assert result["unparsed"].iloc[0] == 4
    assert (tmp_path / "Qwen2.5-VL-7B-Instruct_IVCP_RefCOCO_val_unparsed.csv").is_file()


def test_interrupted_run_resumes_without_recomputing(lmudata, tmp_path, monkeypatch):
    plugin.register()
    from vlmeval.dataset import build_dataset
    from vlmeval.inference import infer_data_job

    dataset = build_dataset("RefCOCO_val")
    name = "Qwen2.5-VL-Tiny_IVCP"
    work = tmp_path / "work"
    work.mkdir()
    original = plugin.IVCPQwenVL.generate_inner

    def interrupted(self, message, dataset=None):
        if plugin.IVCPQwenVL.calls >= 11:
            raise KeyboardInterrupt("stopped by the test")
        return original(self, message, dataset)

    plugin.IVCPQwenVL.calls = 0
    monkeypatch.setattr(plugin.IVCPQwenVL, "generate_inner", interrupted)
    with pytest.raises(KeyboardInterrupt):
        infer_data_job(name, work_dir=str(work), model_name=name, dataset=dataset, verbose=False)
    assert plugin.IVCPQwenVL.calls == 11  # ten answered (VLMEvalKit saved them), the eleventh interrupted
    monkeypatch.setattr(plugin.IVCPQwenVL, "generate_inner", original)
    plugin.IVCPQwenVL.calls = 0
    infer_data_job(name, work_dir=str(work), model_name=name, dataset=dataset, verbose=False)
    assert plugin.IVCPQwenVL.calls == 2  # only the two unanswered samples ran again
    predictions = pd.read_excel(next(work.glob(f"{name}_RefCOCO_val.*")))
    assert len(predictions) == 12


def test_embedded_default_grounding_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LMUData", "IVCP_STATS_DIR")}
    env.update(IVCP_WORK_DIR=str(tmp_path / "out"), PY=sys.executable, PER_SPLIT="2")
    run = subprocess.run(["bash", str(ROOT / "VLMEvalKit/test_ivcp_qwen_grounding.sh")], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["vanilla", "fastv", "pdrop", "vscan", "ivc_prune"]
    assert table[1].split("|")[2].strip() == "100%"
    assert table[-1].split("|")[2].strip() == "50%"
    assert (tmp_path / "out/results/grounding_Qwen2.5-VL-Tiny.md").is_file()


def test_scripts_refuse_bad_input(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LMUData"}
    env.update(IVCP_WORK_DIR=str(tmp_path), PY=sys.executable)
    general = subprocess.run(["bash", str(ROOT / "VLMEvalKit/test_ivcp_qwen_generalvqa.sh")], capture_output=True,
                             text=True, env=env)
    assert general.returncode == 2 and "set LMUData" in general.stderr
    unknown = subprocess.run(["bash", str(ROOT / "VLMEvalKit/test_ivcp_qwen_grounding.sh"), "--modles", "x"],
                             capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "unknown argument --modles" in unknown.stderr
