"""Run output on disk: run_config.json, one JSONL file per shard, crash-safe appends.

An output directory holds one configuration (`run_config.json`) and one JSONL file per
shard, named `<model>-<task>-<methods>.jsonl` (`...-shard<i>of<n>.jsonl` with n > 1 shards).
Each line is one finished question, written, flushed and fsync'd as it completes, so a run
killed at any moment loses at most the batch in flight. On reopening, a last line without
its newline (the write the kill interrupted) or one that does not parse is cut off; a bad
line anywhere else is an error, since appends cannot produce it.

This module needs no JAX, so reports can be made anywhere.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator

CONFIG_NAME = "run_config.json"


class ConfigMismatch(ValueError):
    """The output directory holds results of a different configuration."""


def shard_file(output_dir: str, model: str, task: str, methods, index: int, count: int) -> str:
    name = f"{model}-{task}-{'+'.join(methods)}"
    if count > 1:
        name += f"-shard{index}of{count}"
    return os.path.join(output_dir, name + ".jsonl")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_or_write_config(output_dir: str, config: dict, added_keys: Iterable[str] = ()) -> None:
    """Writes run_config.json, or checks that the one there equals `config`.

    `added_keys`: keys that newer versions write; an existing file without one of them (an
    older version's) is compared without it and kept as it is.

    Raises:
      ConfigMismatch: listing every differing key, when the directory holds another run.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CONFIG_NAME)
    config = json.loads(json.dumps(config))  # normalise tuples etc. as they will be read
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigMismatch(
                f"{path} is not valid JSON ({e}); remove it or use another --output_dir"
            ) from None
        added = set(added_keys)
        config = {k: v for k, v in config.items() if k in old or k not in added}
        if old != config:
            keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            diff = "\n".join(
                f"  {k}: existing {old.get(k, '<absent>')!r}, "
                f"this run {config.get(k, '<absent>')!r}"
                for k in keys
            )
            raise ConfigMismatch(
                f"{output_dir} holds results of a different configuration; refusing to mix "
                f"them. Differences:\n{diff}\nUse another --output_dir, or rerun with the "
                "original flags to resume."
            )
        return
    if any(glob.glob(os.path.join(output_dir, "*.jsonl"))):
        raise ConfigMismatch(
            f"{output_dir} holds .jsonl results but no {CONFIG_NAME}; refusing to mix runs"
        )
    _write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(output_dir: str) -> dict:
    with open(os.path.join(output_dir, CONFIG_NAME), encoding="utf-8") as f:
        return json.load(f)


def _parse(line: bytes) -> dict:
    rec = json.loads(line)
    if not isinstance(rec, dict) or "id" not in rec:
        raise ValueError("not a record")
    return rec


def _scan(path: str) -> tuple[list[dict], int]:
    """Records of a JSONL file and the byte length of its intact part."""
    with open(path, "rb") as f:
        data = f.read()
    records, pos = [], 0
    while (end := data.find(b"\n", pos)) >= 0:
        line = data[pos:end]
        if line.strip():
            try:
                records.append(_parse(line))
            except ValueError:
                if data.find(b"\n", end + 1) < 0:
                    break  # the last line, damaged by a crash: dropped and redone
                line_no = data.count(b"\n", 0, pos) + 1
                raise ValueError(
                    f"{path}: line {line_no} is not a valid record; the "
                    "file is damaged (appends cannot produce this). Remove the line or the "
                    "file to recompute those questions."
                ) from None
        pos = end + 1
    # Anything after the last newline is a write cut short: dropped and redone.
    return records, pos


def read_records(path: str) -> list[dict]:
    """The intact records of one results file (a cut-short last line is ignored)."""
    return _scan(path)[0]


class ResultsFile:
    """Append-only JSONL results of one shard; reopening resumes after the last intact line."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[dict] = []
        if os.path.exists(path):
            self.records, good = _scan(path)
            if good != os.path.getsize(path):
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def ids(self, include_errors: bool = True) -> set[str]:
        """Ids already answered; with include_errors=False, error rows count as not done."""
        latest = {r["id"]: r for r in self.records}
        return {i for i, r in latest.items() if include_errors or not r.get("error")}

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def result_files(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "*.jsonl")))


def merged_records(output_dir: str) -> list[dict]:
    """All shards' records, one per id (the last written wins, e.g. a retried error row)."""
    latest: dict[str, dict] = {}
    for path in result_files(output_dir):
        for rec in read_records(path):
            latest.pop(rec["id"], None)
            latest[rec["id"]] = rec
    return list(latest.values())


def run_dirs(root: str) -> Iterator[str]:
    """root itself if it is a run directory, else every run directory below it."""
    if os.path.exists(os.path.join(root, CONFIG_NAME)):
        yield root
        return
    for dirpath, _, files in sorted(os.walk(root)):
        if CONFIG_NAME in files:
            yield dirpath


def jsonable(x) -> object:
    """numpy scalars/arrays and tuples as plain JSON values."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return jsonable(x.tolist())
    if isinstance(x, float) and x != x:
        return None
    return x
