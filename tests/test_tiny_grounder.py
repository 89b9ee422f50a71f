"""The shipped tiny grounder: it loads offline and grounds; pruning at keep ratio 1 changes nothing;
its training script trains, resumes exactly and lowers the loss."""

import csv
import importlib.util
import random
from pathlib import Path

import pytest
import torch

import ivcp
from ivcp.data.grounding import make_sample
from ivcp.testing import GROUNDER_DIR, grounding_accuracy, tiny_grounder
from ivcp.testing.grounder import prompt_text

ROOT = Path(__file__).resolve().parent.parent
UNSEEN_SEED = 31_337  # neither the training draws nor the held-out sets of the scripts use it


@pytest.fixture(scope="module")
def grounder():
    return tiny_grounder()


def test_the_shipped_checkpoint_grounds(grounder):
    model, processor = grounder
    assert (GROUNDER_DIR / "model.safetensors").stat().st_size < 10e6
    accuracy, parsed = grounding_accuracy(model, processor, 100, UNSEEN_SEED)
    assert accuracy >= 85.0 and parsed == 1.0


KEEP_ALL = {
    "fastv": {"keep_ratio": 1.0}, "window_fastv": {"keep_ratio": 1.0}, "ivc_prune": {"keep_ratio": 1.0},
    "random": {"keep_ratio": 1.0}, "adaptprune": {"keep_ratio": 1.0},
    "pdrop": {"stage_ratios": (1.0, 1.0, 1.0)}, "vscan": {"encoder_keep_ratio": 1.0, "llm_keep_ratio": 1.0},
    "ivc_union": {"base": "fastv", "base_params": {"keep_ratio": 1.0}},
}


def test_keep_everything_gives_the_unpruned_answers(grounder):
    model, processor = grounder
    assert set(KEEP_ALL) | {"drop_ivc"} == set(ivcp.available_methods())  # drop_ivc always drops the IVC tokens
    rng = random.Random(UNSEEN_SEED + 1)
    samples = [make_sample(rng) for _ in range(4)]
    for sample in samples:
        inputs = processor(text=[prompt_text(processor, sample["expression"])], images=[sample["image"]],
                           return_tensors="pt")
        with torch.no_grad():
            bare = model.generate(**inputs, max_new_tokens=40, do_sample=False)
            for method, params in KEEP_ALL.items():
                with ivcp.prune(model, method, **params) as session:
                    pruned = model.generate(**inputs, max_new_tokens=40, do_sample=False)
                assert session.last.n_visual_kept == session.last.n_visual == 64, method
                assert torch.equal(bare, pruned), method


def _trainer():
    spec = importlib.util.spec_from_file_location("train_tiny_grounder", ROOT / "scripts/train_tiny_grounder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_runs_resumes_exactly_and_lowers_the_loss(tmp_path):
    trainer = _trainer()
    common = ["--batch-size", "4", "--warmup", "2", "--lr", "3e-3", "--eval-every", "0", "--save-every", "2", "--threads", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with torch.no_grad():  # as after `import vlmeval.vlm`, which turns gradients off process-wide
        assert trainer.main(["--out", str(straight), "--steps", "8", *common]) == 0
    assert trainer.main(["--out", str(resumed), "--steps", "8", "--stop-at", "4", *common]) == 0  # stopped at 4 ...
    assert trainer.main(["--out", str(resumed), "--steps", "8", *common]) == 0  # ... and resumed to 8
    a = torch.load(straight / "state.pt", weights_only=False)["model"]
    b = torch.load(resumed / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same data and optimiser state: the same weights
    with open(resumed / "log.csv", newline="") as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert trainer.main(["--out", str(resumed), "--export", str(tmp_path / "export")]) == 0
    model, _ = tiny_grounder(tmp_path / "export")
    assert torch.equal(model.state_dict()["lm_head.weight"], b["lm_head.weight"])
