"""The README as a newcomer uses it: the offline snippet runs as pasted and prints what the README shows;
the set-up-and-go commands are two, and CI runs exactly the second."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M) if lang == language]


def test_the_offline_snippet_runs_as_pasted_and_prints_what_the_readme_shows(tmp_path):
    section = _section("Try it offline")
    [snippet] = _blocks(section, "python")
    [shown] = _blocks(section, "")
    assert len(snippet.strip().splitlines()) <= 20
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines() == shown.strip().splitlines()


def test_two_commands_set_up_and_go_and_ci_runs_the_test_command():
    commands = _blocks(_section("Set up and go (fresh machine)"), "bash")
    assert len(commands) == 2
    assert all(len(c.strip().splitlines()) == 1 for c in commands)
    main_job, tests = (c.strip() for c in commands)
    assert main_job.startswith("bash scripts/setup.sh && ") and tests.startswith("bash scripts/setup.sh && ")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [tests]


def test_ivc_is_spelled_out_and_every_family_is_named():
    opening = README[: README.index("\n## ")]
    assert "Implicit Visual Coordinates" in opening
    for family in ("Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL", "LLaVA", "InternVL"):
        assert family in opening
    assert "both families" not in README
