"""Which data an evaluation's outputs answer, so a work dir never mixes answers to different data.

VLMEvalKit keys predictions by the row's ``index`` only: a TSV replaced under the same indices would
be resumed from the old answers. ivcp keys them by the data file: beside each model × dataset's
predictions, ``<work dir>/<model>/<model>_<dataset>_data.json`` records the TSV it answers (path,
size, sha256). ``VLMEvalKit/run.py`` checks it before any inference (:func:`check_work_dir`): the
same file resumes; another file (or predictions without a record) stops the run naming the files;
a prediction file cut short by a killed write is moved aside, and the run makes it again. The
tables (:mod:`ivcp.results`) print each benchmark's data file and hash, and show a cell whose
predictions answer other data than the current file as missing. No VLMEvalKit import here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from .grounding import GROUNDING_SPLITS

PREDICTION_FORMATS = ("xlsx", "tsv", "json")


def lmudata_root(env: dict | None = None) -> Path:
    """``$LMUData``, which must name an existing folder: VLMEvalKit would otherwise fall back to
    ``~/LMUData`` (creating it) without a word. ValueError with a one-line reason."""
    value = (os.environ if env is None else env).get("LMUData")
    if not value:
        raise ValueError("LMUData is not set: export LMUData=<the folder with the benchmarks' TSVs> "
                         "(VLMEvalKit's own default is ~/LMUData: export LMUData=~/LMUData to mean it)")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ValueError(f"LMUData={value} is not a folder (mistyped?); it must hold the benchmarks' TSVs")
    return root


def data_file(dataset: str, root: str | Path) -> Path | None:
    """The TSV a dataset is read from (as ivcp's grounding splits and VLMEvalKit's image datasets
    resolve it): ``<root>/<dataset>.tsv``; a grounding split without its own file is read from the
    aggregated ``RefCOCO.tsv``. None when there is none."""
    root = Path(root)
    path = root / f"{dataset}.tsv"
    if path.is_file():
        return path
    if dataset in GROUNDING_SPLITS and (root / "RefCOCO.tsv").is_file():
        return root / "RefCOCO.tsv"
    return None


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(dataset: str, root: str | Path) -> dict | None:
    """{"dataset", "file", "bytes", "sha256"} of the data a dataset is read from (None: no file)."""
    path = data_file(dataset, root)
    if path is None:
        return None
    return {"dataset": dataset, "file": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256(path)}


def manifest_path(work_dir: str | Path, model: str, dataset: str) -> Path:
    return Path(work_dir) / model / f"{model}_{dataset}_data.json"


def read_manifest(work_dir: str | Path, model: str, dataset: str) -> dict | None:
    """The recorded data of a model × dataset's outputs (None: no record, or an unreadable one)."""
    path = manifest_path(work_dir, model, dataset)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        return entry if isinstance(entry, dict) and "sha256" in entry else None
    except (OSError, ValueError):
        return None


def prediction_file(work_dir: str | Path, model: str, dataset: str) -> Path | None:
    """VLMEvalKit's prediction file of a model × dataset (any of its formats), None when absent."""
    for ext in PREDICTION_FORMATS:
        path = Path(work_dir) / model / f"{model}_{dataset}.{ext}"
        if path.is_file():
            return path
    return None


def outputs(work_dir: str | Path, model: str, dataset: str, stats_root: str | Path | None = None) -> list[Path]:
    """Every file holding answers or statistics of a model × dataset: the prediction file, VLMEvalKit's
    partial ``<rank><world>_<dataset>.pkl`` / ``_PREV.pkl`` / ``_checkpoint.pkl`` and ivcp's statistics."""
    folder = Path(work_dir) / model
    found = [p for p in (prediction_file(work_dir, model, dataset),) if p is not None]
    if folder.is_dir():
        partial = re.compile(rf"\d+_{re.escape(dataset)}\.pkl")
        found += sorted(p for p in folder.iterdir() if partial.fullmatch(p.name))
        found += [p for p in (folder / f"{model}_{dataset}_PREV.pkl", folder / f"{model}_{dataset}_checkpoint.pkl")
                  if p.is_file()]
    if stats_root is not None and (Path(stats_root) / model / f"{dataset}.jsonl").is_file():
        found.append(Path(stats_root) / model / f"{dataset}.jsonl")
    return found


def readable_predictions(path: str | Path) -> bool:
    """Whether a prediction file can be read whole (a kill during VLMEvalKit's write leaves an
    ``.xlsx`` that is not a zip file, or a cut-short ``.tsv`` / ``.json``)."""
    frame = _read_predictions(path)
    return frame is not None and "index" in frame.columns and "prediction" in frame.columns


def _read_predictions(path: str | Path):
    """A prediction file (.xlsx, .tsv or .json) as a DataFrame, or None when it cannot be read. Read once
    per version of the file (path, size, modification time): a table asks about each file several times."""
    path = Path(path)
    try:
        status = path.stat()
    except OSError:
        return None
    return _read_predictions_version(str(path), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _read_predictions_version(path: str, size: int, mtime_ns: int):
    import pandas as pd

    path = Path(path)
    try:
        if path.suffix == ".xlsx":
            return pd.read_excel(path)
        if path.suffix == ".tsv":
            return pd.read_csv(path, sep="\t")
        return pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001  (any failure to read means the same: damaged)
        return None


def answered_indices(path: str | Path) -> list[str] | None:
    """The ``index`` column of a prediction file as strings (None when it cannot be read)."""
    frame = _read_predictions(path)
    if frame is None or "index" not in frame.columns or "prediction" not in frame.columns:
        return None
    return [str(v) for v in frame["index"]]


def recover_damaged(work_dir: str | Path, model: str, dataset: str) -> str | None:
    """Move a prediction file that cannot be read (a killed write) aside to ``<file>.damaged`` and
    its score files with it (they came from the lost file), so the run makes it again from
    VLMEvalKit's partial files or by answering again. Returns a one-line note, None when nothing was wrong."""
    path = prediction_file(work_dir, model, dataset)
    if path is None or readable_predictions(path):
        return None
    target = path.with_name(path.name + ".damaged")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.damaged{number}")
    path.rename(target)
    moved = [target.name]
    stem = f"{model}_{dataset}_"
    for score in sorted(path.parent.glob(f"{stem}*")):
        if score.suffix in (".csv", ".json", ".xlsx") and score.name[len(stem):].split(".")[0] in (
                "acc", "score", "unparsed"):
            score.rename(score.with_name(score.name + ".stale"))
            moved.append(score.name + ".stale")
    return (f"{path} could not be read (a run killed while writing it?): moved to {', '.join(moved)}; "
            "its answers are made again")


def check_work_dir(work_dir: str | Path, models: list[str], datasets: list[str], root: str | Path,
                   stats_root: str | Path | None = None, write: bool = True) -> tuple[list[str], list[str]]:
    """Before any inference: (errors, notes). For each model × dataset, its outputs must answer the
    current data file: a record of another file, or outputs without a record, is an error naming the
    files; a damaged prediction file is moved aside (a note). With ``write``, the data of pairs that
    pass is recorded (rank 0 of a multi-process run writes, the others only check)."""
    errors, notes = [], []
    identities = {d: identity(d, root) for d in datasets}
    for model in models:
        for dataset in datasets:
            current = identities[dataset]
            if current is None:  # no file: VLMEvalKit's own error follows (it cannot download here)
                continue
            recorded = read_manifest(work_dir, model, dataset)
            same = recorded is not None and recorded["sha256"] == current["sha256"]
            existing = [] if same else outputs(work_dir, model, dataset, stats_root)
            if existing and recorded is not None:
                errors.append(
                    f"{Path(work_dir) / model}: the {dataset} outputs answer {recorded.get('file')} (sha256 "
                    f"{recorded['sha256'][:12]}…), but {current['file']} is now sha256 {current['sha256'][:12]}…: "
                    f"use another --work-dir, or delete {', '.join(map(str, existing))} to run it again")
                continue
            if existing:
                errors.append(f"{', '.join(map(str, existing))}: outputs of {model} on {dataset} with no record "
                              "of the data they answer: use another --work-dir, or delete them to run it again")
                continue
            if write:
                note = recover_damaged(work_dir, model, dataset) if same else None
                if note:
                    notes.append(note)
                if not same:  # no outputs yet: record the data they will answer
                    path = manifest_path(work_dir, model, dataset)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")
    return errors, notes
