"""Per-sample pruning statistics of an evaluation run, for the tables' "Average Tokens" column.

One JSON line per answered sample in ``<stats dir>/<model name>/<dataset>.jsonl``, keyed by the
sample's ``index``: a resumed or repeated sample overwrites its earlier line when read (the last
line of an index wins), so no sample is ever counted twice. The stats dir belongs to one run's work
dir (``VLMEvalKit/run.py`` sets ``IVCP_STATS_DIR=<work dir>/ivcp_stats``). A damaged last line (a run
killed while writing) is skipped with a warning; it can never count, because a sample without
statistics makes the average "unknown" instead of wrong, and the resumed run answers it again.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable

STATS_ENV = "IVCP_STATS_DIR"


def stats_dir() -> Path:
    """Where this process writes and reads statistics (``$IVCP_STATS_DIR``, else ./outputs/ivcp_stats)."""
    return Path(os.environ.get(STATS_ENV) or "outputs/ivcp_stats")


def stats_file(model_name: str, dataset: str, root: str | Path | None = None) -> Path:
    return Path(root if root is not None else stats_dir()) / model_name / f"{dataset}.jsonl"


def record(model_name: str, dataset: str, index, stats: dict, root: str | Path | None = None) -> None:
    """Append one sample's statistics (``index`` identifies the sample within the dataset)."""
    path = stats_file(model_name, dataset, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"index": _key(index), **stats})
    with open(path, "a+", encoding="utf-8") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():  # a line cut short by a killed run must not swallow this one
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":
                line = "\n" + line
        handle.write(line + "\n")


def _key(index) -> str:
    # indices arrive as ints, numpy ints or strings depending on the TSV: one canonical form
    try:
        return str(int(index))
    except (TypeError, ValueError):
        return str(index)


def read(model_name: str, dataset: str, root: str | Path | None = None) -> dict[str, dict]:
    """index -> statistics (the last line of each index); {} when there is no file."""
    path = stats_file(model_name, dataset, root)
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    out: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = str(entry.pop("index"))
        except (json.JSONDecodeError, AttributeError, KeyError):
            warnings.warn(f"{path}: ignoring damaged line {number} (a run killed while writing); that sample's "
                          "statistics are written again when it is answered again")
            continue
        out[key] = entry
    return out


def average_share(model_name: str, dataset: str, indices: Iterable | None = None,
                  root: str | Path | None = None) -> float | None:
    """Mean retained share of visual KV ("Average Tokens") over the samples ``indices`` (all recorded
    samples when None). None — never a partial average — when any of them has no statistics."""
    entries = read(model_name, dataset, root)
    keys = list(entries) if indices is None else [_key(i) for i in indices]
    if not keys or any(k not in entries for k in keys):
        return None
    return sum(float(entries[k]["visual_kv_share"]) for k in keys) / len(keys)
