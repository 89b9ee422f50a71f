"""Several ranks on a CPU: the main job with --nproc 2 (VLMEvalKit's NCCL swapped for gloo by ivcp's
launcher) gives the one-rank table, Average Tokens included; so does a run whose rank 1 was killed,
resumed with --reuse."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vlmeval")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "VLMEvalKit" / "test_ivcp_qwen_grounding.sh"
ARGS = ["--models", "Qwen2.5-VL-TinyGrounder", "--methods", "vanilla,ivc_prune", "--data", "RefCOCO_val"]


def _env(lmudata: Path, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    return {**env, "LMUData": str(lmudata), "IVCP_WORK_DIR": str(work), "PY": sys.executable, "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def _table(work: Path) -> list[str]:
    text = (work / "results" / "grounding_Qwen2.5-VL-TinyGrounder.md").read_text()
    return [line for line in text.splitlines() if line.startswith("|")]


def _rank_pid(work: Path, rank: int) -> int | None:
    """The pid of our run.py process of ``rank`` (found by its environment: our work dir and RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"IVCP_WORK_DIR={work}".encode() in environ and f"RANK={rank}".encode() in environ
                and b"run.py" in cmdline):
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def lmudata(tmp_path_factory):
    from ivcp.data.grounding import make_grounding

    folder = tmp_path_factory.mktemp("lmudata")
    make_grounding(folder, per_split=3, seed=7, splits=("RefCOCO_val",))
    return folder


@pytest.fixture(scope="module")
def one_rank(lmudata, tmp_path_factory):
    work = tmp_path_factory.mktemp("one_rank")
    run = subprocess.run(["bash", str(SCRIPT), *ARGS], env=_env(lmudata, work), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return _table(work)


def test_two_ranks_give_the_one_rank_table(lmudata, one_rank, tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), *ARGS, "--nproc", "2"], env=_env(lmudata, tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Rank 1/2" in run.stderr + run.stdout  # two ranks really ran
    assert _table(tmp_path) == one_rank
    assert [row.split("|")[2].strip() for row in one_rank[2:]] == ["100%", "50%"]  # Average Tokens present


def test_a_killed_rank_resumed_gives_the_one_rank_table(lmudata, one_rank, tmp_path):
    env = _env(lmudata, tmp_path)
    proc = subprocess.Popen(["bash", str(SCRIPT), *ARGS, "--nproc", "2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        stats = tmp_path / "vlmeval" / "ivcp_stats"
        while time.time() < deadline and proc.poll() is None:  # kill rank 1 once the first answers are in
            if stats.is_dir() and any(p.stat().st_size > 0 for p in stats.rglob("*") if p.is_file()):
                pid = _rank_pid(tmp_path, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the two-rank run ended or stalled before a rank could be killed")
        assert proc.wait(timeout=600) != 0  # the run with a killed rank fails
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    resumed = subprocess.run(["bash", str(SCRIPT), *ARGS, "--nproc", "2", "--", "--reuse"], env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _table(tmp_path) == one_rank
