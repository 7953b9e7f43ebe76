"""Run output on disk: run_config.json, one JSONL file per shard, crash-safe appends.

An output directory holds one configuration (`run_config.json`) and one JSONL file per
shard, named `<model>-<task>-<methods>.jsonl` (`...-shard<i>of<n>.jsonl` with n > 1 shards).
Each line is one finished question, written, flushed and fsync'd as it completes, so a run
killed at any moment loses at most the batch in flight. On reopening, a last line without
its newline (the write the kill interrupted) or one that does not parse is cut off; a bad
line anywhere else is an error, as appends cannot produce it. A question answered again
(a retried error) is appended, and `ResultsFile.compact` rewrites the file atomically with
one line per id, so a reader of a finished file sees each question once.

One process writes a shard file at a time: `shard_lock` holds an flock on `<file>.lock`
(with the holder's pid and host in it) for the whole run; the OS releases it when the
process ends, kill -9 included. A run_config.json is compared and written under a
second flock, on `run_config.json.lock`, so shards starting together agree on it.

This module needs no JAX, so reports can be made anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import socket
from collections.abc import Iterable, Iterator

CONFIG_NAME = "run_config.json"
# run_config.json keys by what they describe; a refusal names the kinds that changed.
WEIGHTS_KEYS = ("model", "weights")
DATA_KEYS = ("data", "data_content", "num_examples")


class ConfigMismatch(ValueError):
    """The output directory holds results of a different configuration."""


class OutputDirError(ValueError):
    """The output directory cannot be created or written."""


class Locked(ValueError):
    """Another process holds the results file's lock."""


class DamagedRun(ValueError):
    """A run directory whose run_config.json or results cannot be read."""


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


def _changes(old: dict, new: dict) -> str:
    """One line: weights, settings changed (layer: existing None, this run '2'; ...)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    kinds = [kind for kind, members in (("weights", WEIGHTS_KEYS), ("data", DATA_KEYS))
             if any(k in members for k in keys)]  # fmt: skip
    if any(k not in WEIGHTS_KEYS + DATA_KEYS for k in keys):
        kinds.append("settings")
    diff = "; ".join(
        f"{k}: existing {old.get(k, '<absent>')!r}, this run {new.get(k, '<absent>')!r}"
        for k in keys
    )
    return f"{', '.join(kinds)} changed ({diff})"


def has_results(output_dir: str) -> bool:
    """Whether any results file of the directory holds a byte (a record or part of one)."""
    return any(os.path.getsize(p) > 0 for p in result_files(output_dir))


def check_config(output_dir: str, config: dict, added_keys: Iterable[str] = ()) -> bool:
    """Checks `config` against the directory's run_config.json; True if it must be written.

    A directory without results takes a new configuration (a failed start leaves nothing
    to mix). `added_keys`: keys compared only where the existing file holds them; a file
    without one is compared without it and kept as it is.

    Raises:
      ConfigMismatch: one line naming what changed (weights, data, settings) and every
        differing key, when the directory holds results of another configuration.
    """
    path = os.path.join(output_dir, CONFIG_NAME)
    config = json.loads(json.dumps(config))  # normalise tuples etc. as they will be read
    if not os.path.exists(path):
        if has_results(output_dir):
            raise ConfigMismatch(
                f"{output_dir} holds .jsonl results but no {CONFIG_NAME}; refusing to mix runs"
            )
        return True
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigMismatch(
            f"{path} is not valid JSON ({e}); remove it or use another --output_dir"
        ) from None
    added = set(added_keys)
    kept = {k: v for k, v in config.items() if k in old or k not in added}
    if old == kept:
        return False
    if not has_results(output_dir):
        return True
    raise ConfigMismatch(
        f"{output_dir} holds results of a different configuration; refusing to mix them: "
        f"{_changes(old, kept)}. Use another --output_dir, or rerun with the original "
        "weights, data and flags to resume."
    )


def check_or_write_config(output_dir: str, config: dict, added_keys: Iterable[str] = ()) -> None:
    """`check_config`, then writes run_config.json if needed, under the directory's config
    lock (shards starting together see one configuration)."""
    os.makedirs(output_dir, exist_ok=True)
    with _flock(os.path.join(output_dir, CONFIG_NAME + ".lock"), blocking=True):
        if check_config(output_dir, config, added_keys):
            text = json.dumps(json.loads(json.dumps(config)), indent=2, sort_keys=True)
            _write_atomic(os.path.join(output_dir, CONFIG_NAME), text + "\n")


@contextlib.contextmanager
def _flock(path: str, blocking: bool) -> Iterator[int]:
    """An exclusive flock on path (created if needed), released on exit or process death."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextlib.contextmanager
def shard_lock(results_path: str) -> Iterator[None]:
    """Holds `<results_path>.lock` for a run: a second run of the same shard is refused.

    Creates the output directory. The lock file keeps the last holder's pid and host.

    Raises:
      OutputDirError: the directory cannot be created or written (one line).
      Locked: another process holds the lock (naming its pid and host).
    """
    out_dir = os.path.dirname(results_path) or "."
    lock_path = results_path + ".lock"
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise OutputDirError(f"--output_dir {out_dir}: a file is in the way") from None
    except OSError as e:
        reason = e.strerror or str(e)
        raise OutputDirError(f"--output_dir {out_dir}: cannot write there ({reason})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise Locked(
                f"{results_path} is being written by another run ({holder}); wait for it to "
                "finish or stop it (two runs would answer every question twice)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (as the OS does when the process dies)


def read_config(output_dir: str, required: Iterable[str] = ()) -> dict:
    """run_config.json of a run directory.

    Raises:
      DamagedRun: the file is missing, not a JSON object, or lacks a `required` key.
    """
    path = os.path.join(output_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise DamagedRun(f"{output_dir}: no {CONFIG_NAME} (not an eval.run directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedRun(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DamagedRun(f"{path}: not an eval.run configuration (not a JSON object)")
    missing = [k for k in required if k not in config]
    if missing:
        raise DamagedRun(f"{path}: not an eval.run configuration (missing {', '.join(missing)})")
    return config


def file_fingerprint(path: str) -> str:
    """'<size>-<sha256 prefix>' of a file's bytes: mtime-free, so a copy keeps it.

    Streams the file in 1 MiB blocks: about 1.5 s per GB on one core (sha256; the read from
    disk is usually the larger part).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{size}-{digest.hexdigest()[:16]}"


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
                raise DamagedRun(
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


def _latest(recs: Iterable[dict]) -> dict[str, dict]:
    """One record per id: the last in the file, at its place."""
    latest: dict[str, dict] = {}
    for rec in recs:
        latest.pop(rec["id"], None)
        latest[rec["id"]] = rec
    return latest


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


class ResultsFile:
    """Append-only JSONL results of one shard; reopening resumes after the last intact line.

    The file is created on the first append, so a run that stops before answering leaves
    no results file behind.
    """

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
        self._f = None

    def ids(self, include_errors: bool = True) -> set[str]:
        """Ids already answered; with include_errors=False, error rows count as not done."""
        latest = _latest(self.records)
        return {i for i, r in latest.items() if include_errors or not r.get("error")}

    def latest(self) -> dict[str, dict]:
        """{id: its last written record}."""
        return _latest(self.records)

    def append(self, record: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._f.write(_line(record))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.append(record)

    def compact(self) -> None:
        """Rewrites the file with one record per id (the last written), atomically: a
        reader sees the old file or the new one, never a mix."""
        latest = _latest(self.records)
        if len(latest) == len(self.records):
            return
        self.close()
        _write_atomic(self.path, "".join(_line(r) for r in latest.values()))
        self.records = list(latest.values())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def result_files(output_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "*.jsonl")))


def merged_records(output_dir: str) -> list[dict]:
    """All shards' records, one per id (the last written wins, e.g. a retried error row)."""
    return list(_latest(r for p in result_files(output_dir) for r in read_records(p)).values())


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
