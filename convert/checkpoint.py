"""Reading and writing HF checkpoint directories, and mapping their keys onto Flax params.

Safetensors only: pickled `.bin` / `.pt` weights are refused, never unpickled (loading a
pickle runs arbitrary code). A mapping is one ordered regex table that normalises HF key
prefixes, then a structural rule shared by all families:
  `layers.N` -> `layers_N`; `.weight` -> `kernel` (Linear: transposed; Conv: OIHW -> HWIO),
  `scale` (norms) or `embedding` (embeddings), whichever the Flax tree has there.
Every checkpoint key must be used and every param filled, or one error lists all offenders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some checkpoints carry that are not parameters (recomputed by the model).
IGNORED_KEYS = (re.compile(r"(^|\.)position_ids$"), re.compile(r"rotary_emb\.inv_freq$"))


class CheckpointError(ValueError):
    """A checkpoint directory or its contents cannot be loaded; the message says why."""


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path!r} has no config.json; expected an HF checkpoint directory")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None


def _weight_map(index: str) -> dict[str, str]:
    """The key -> shard file map of a model.safetensors.index.json, or a CheckpointError."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = set(weight_map.values())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index} is not valid JSON ({e}); re-download it") from None
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f'{index} has no "weight_map" object of key -> shard file; re-download it'
        ) from None
    bad = sorted(repr(n) for n in names if not isinstance(n, str))
    if bad:
        raise CheckpointError(f"{index} names shards that are not file names: {', '.join(bad)}")
    return weight_map


def _shard_names(index: str) -> list[str]:
    """The shard files a model.safetensors.index.json names, or a CheckpointError."""
    return sorted(set(_weight_map(index).values()))


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files (from the shard index when there is one)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = _shard_names(index)
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing}")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(path, f) for f in files]
    pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise CheckpointError(
            f"{path!r} holds only pickled weights ({', '.join(pickled)}); they are not loaded "
            "because unpickling can run arbitrary code. Convert them once with transformers: "
            "`AutoModelForImageTextToText.from_pretrained(path).save_pretrained(out, "
            "safe_serialization=True)`, then load `out`."
        )
    raise CheckpointError(f"{path!r} has no *.safetensors weights")


# `weights_fingerprint`: files up to this size are hashed whole; larger ones by their size,
# header and evenly spaced samples (a 7B checkpoint's 14 GB would take a minute to hash).
_WHOLE_HASH_BYTES = 64 << 20
_SAMPLE_BYTES = 1 << 20
_SAMPLES = 32


def weights_fingerprint(path: str) -> str:
    """A short hex digest that changes when the checkpoint's weights change.

    Hashes each safetensors file's name and size, then the whole file when it is at most 64
    MiB (the demo model, tiny test models), else its first and last MiB and 30 evenly spaced
    MiB between (retraining or fine-tuning changes every tensor, so every sample; an edit
    confined to a few bytes of a large file between samples would go unseen). Independent of
    modification times, so a copied checkpoint keeps its fingerprint.

    Raises:
      CheckpointError: the directory holds no safetensors weights.
    """
    digest = hashlib.sha256()
    for file in safetensors_files(path):
        size = os.path.getsize(file)
        digest.update(f"{os.path.basename(file)}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= _WHOLE_HASH_BYTES:
                for block in iter(lambda: f.read(_SAMPLE_BYTES), b""):
                    digest.update(block)
                continue
            last = size - _SAMPLE_BYTES
            for k in range(_SAMPLES):
                f.seek(k * last // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


# safetensors refuses headers above 100 MB; a larger length means the file is something else.
_MAX_HEADER_BYTES = 100 << 20
_LFS_POINTER = b"version https://git-lfs"
# safetensors dtype names -> numpy dtypes (little-endian; bfloat16 and float8 via ml_dtypes).
_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file, as its header says."""

    file: str
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int

    def stand_in(self) -> np.ndarray:
        """A zero-byte array of the tensor's shape and dtype (a broadcast scalar), for checks
        that look at shapes and dtypes only."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)


def _entry(file: str, key: str, value, data_start: int) -> TensorEntry:
    """One header entry, or TypeError/ValueError/KeyError when it is malformed."""
    shape = tuple(value["shape"])
    start, end = (int(x) for x in value["data_offsets"])
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= start <= end:
        raise ValueError(key)
    dtype = _DTYPES.get(value["dtype"])
    if dtype is None:
        raise CheckpointError(
            f"{file}: tensor {key!r} has dtype {value['dtype']!r}, which is not read "
            f"(supported: {', '.join(_DTYPES)})"
        )
    want = math.prod(shape) * dtype.itemsize
    if end - start != want:
        raise CheckpointError(
            f"{file}: the header gives tensor {key!r} shape {list(shape)} {value['dtype']} "
            f"({want} bytes) but {end - start} bytes of data; re-download or re-export it"
        )
    return TensorEntry(file, key, dtype, shape, data_start + start, want)


def safetensors_header(file: str) -> dict[str, TensorEntry]:
    """Reads a safetensors file's header, checks it and the file's size against it, and says
    where each tensor lies; no tensor data is read.

    Returns:
      key -> TensorEntry, in the header's order.

    Raises:
      CheckpointError: the file is empty, truncated, a Git LFS pointer or not safetensors; a
        tensor's dtype is not one numpy reads, or its byte range does not fit its shape.
    """
    size = os.path.getsize(file)
    redo = "re-download or re-export it"
    if size == 0:
        raise CheckpointError(f"{file} is empty (0 bytes); {redo}")
    with open(file, "rb") as f:
        start = f.read(len(_LFS_POINTER))
        if start == _LFS_POINTER:
            raise CheckpointError(
                f"{file} is a Git LFS pointer ({size} bytes), not the weights; fetch them with "
                "`git lfs pull` in the checkpoint's repository"
            )
        if size < 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes, no complete header; {redo}")
        (n,) = struct.unpack("<Q", start[:8])
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{file} is not a safetensors file (no valid header); {redo}")
        if 8 + n > size:
            raise CheckpointError(
                f"{file} is truncated: {size} bytes, its header alone needs {8 + n}; {redo}"
            )
        f.seek(8)
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(
                f"{file} has a damaged header (not safetensors JSON); {redo}"
            ) from None
    data, want = size - 8 - n, max(ends, default=0)
    if data < want:
        raise CheckpointError(
            f"{file} is truncated: {data} bytes of tensor data, its header describes {want} "
            f"({want - data} missing); {redo}"
        )
    entries = {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        try:
            entries[key] = _entry(file, key, value, 8 + n)
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(
                f"{file} has a damaged header (tensor {key!r}: {value!r}); {redo}"
            ) from None
    return entries


def check_safetensors_file(file: str) -> None:
    """Reads a safetensors file's header and checks that the file holds all the tensor data it
    describes, so that an empty, truncated or foreign file fails with one line naming it.

    Raises:
      CheckpointError: the file is empty, truncated, a Git LFS pointer or not safetensors.
    """
    safetensors_header(file)


def checkpoint_entries(path: str) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint directory, from the safetensors headers alone.

    Returns:
      key -> TensorEntry, shard by shard in file order.

    Raises:
      CheckpointError: a file fails `safetensors_header`, a key is in two shards, or the shard
        index maps a key to a shard that does not hold it.
    """
    files = safetensors_files(path)
    out: dict[str, TensorEntry] = {}
    for file in files:
        for key, entry in safetensors_header(file).items():
            if key in out:
                raise CheckpointError(
                    f"key {key!r} appears in more than one shard ({out[key].file}, {file})"
                )
            out[key] = entry
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        for key, shard in _weight_map(index).items():
            held = out.get(key)
            if held is None or os.path.basename(held.file) != shard:
                where = "no shard holds it" if held is None else f"it is in {held.file}"
                raise CheckpointError(
                    f"{index} maps key {key!r} to {os.path.join(path, shard)}, but {where}; "
                    "re-download the checkpoint"
                )
    return out


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """One tensor's data, read from its file into a fresh array (no mapping kept open).

    Raises:
      CheckpointError: the file ends before the tensor does (changed since its header was read).
    """
    out = np.empty(entry.shape, entry.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.offset)
        done = 0
        while done < entry.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(
                    f"{entry.file} is truncated: tensor {entry.key!r} ends past the end of the "
                    "file; re-download or re-export it"
                )
            done += n
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bfloat16 via ml_dtypes).

    Every file's header is checked (`checkpoint_entries`) before any tensor is read.
    """
    return {key: read_tensor(e) for key, e in checkpoint_entries(path).items()}


def normalise_key(key: str, table: Iterable[tuple[str, str]]) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def _flax_path(key: str, expected: Mapping) -> tuple[str, ...]:
    """HF dotted key -> Flax param path, resolving `.weight` by what the Flax tree holds."""
    parts = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", key).split(".")
    *prefix, leaf = parts
    node = expected
    for p in prefix:
        node = node.get(p, {}) if isinstance(node, Mapping) else {}
    if leaf == "weight":
        for name in ("kernel", "scale", "embedding"):
            if isinstance(node, Mapping) and name in node:
                return (*prefix, name)
        return (*prefix, "kernel")
    return (*prefix, leaf)


def to_flax(leaf_name: str, value: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel" and value.ndim == 2:
        return value.T  # Linear [out, in] -> Dense [in, out]
    if leaf_name == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # Conv OIHW -> HWIO
    return value


def from_flax(leaf_name: str, value: np.ndarray) -> np.ndarray:
    if leaf_name == "kernel" and value.ndim == 2:
        return value.T
    if leaf_name == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def _is_float(value: np.ndarray) -> bool:
    return jnp.issubdtype(value.dtype, jnp.floating)  # bfloat16 too, unlike np.issubdtype


# `all_finite` scans a tensor in chunks of this many values (a bounded bool temporary).
_FINITE_CHUNK = 1 << 22
_SHOWN_KEYS = 5


def all_finite(value: np.ndarray) -> bool:
    """Whether a float tensor holds no NaN or inf (True for other dtypes).

    One pass over the data (np.isfinite in chunks): tens of milliseconds per 100 M values on
    one CPU core.
    """
    if not _is_float(value):
        return True
    flat = np.ravel(value, order="K")  # memory order: a view of a transposed kernel too
    return all(
        np.isfinite(flat[start : start + _FINITE_CHUNK]).all()
        for start in range(0, flat.size, _FINITE_CHUNK)
    )


def nonfinite_keys(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """The keys of the float tensors that hold a NaN or an inf, in order."""
    return [key for key, value in tensors.items() if not all_finite(value)]


def _match(
    shapes: Mapping[str, np.ndarray],
    expected: Mapping,
    table: Iterable[tuple[str, str]],
    aliases: Mapping[tuple[str, ...], tuple[str, ...]],
    fetch: Callable[[str], np.ndarray],
) -> dict[tuple[str, ...], str]:
    """Which checkpoint key fills each param, from shapes and dtypes alone (`shapes` holds an
    array or a zero-byte stand-in per key); an alias is compared to its target through
    `fetch`, two tensors at a time. Raises map_checkpoint's structural CheckpointError."""
    want = _flatten(expected)
    source: dict[tuple[str, ...], str] = {}  # path -> the checkpoint key that fills it
    unused, mismatched, not_float = [], [], []
    failed: set[tuple[str, ...]] = set()
    alias_keys: dict[tuple[str, ...], str] = {}
    for key, value in shapes.items():
        if any(p.search(key) for p in IGNORED_KEYS):
            continue
        path = _flax_path(normalise_key(key, table), expected)
        if path in aliases:
            alias_keys[path] = key
            continue
        if path not in want:
            unused.append(key)
            continue
        if path in source:
            unused.append(f"{key} (fills {'/'.join(path)} as {source[path]} does)")
            continue
        source[path] = key
        value = to_flax(path[-1], value)
        if tuple(value.shape) != tuple(want[path].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs expected "
                              f"{tuple(want[path].shape)} (as {'/'.join(path)})")  # fmt: skip
            failed.add(path)
        elif jnp.issubdtype(want[path].dtype, jnp.floating) and not _is_float(value):
            not_float.append(f"{key}: {value.dtype} (as {'/'.join(path)})")
            failed.add(path)
    missing = ["/".join(p) for p in want if p not in source]
    for path, key in alias_keys.items():
        target = aliases[path]
        if target in source and target not in failed:
            a, b = shapes[key], shapes[source[target]]
            # Same HF layout; two tensors in memory at a time.
            if a.shape != b.shape or not np.array_equal(fetch(key), fetch(source[target])):
                unused.append(f"{key} (differs from the tied {'/'.join(target)})")
    if unused or missing or mismatched or not_float:
        lines = []
        if unused:
            lines.append(f"{len(unused)} checkpoint keys not used: " + ", ".join(sorted(unused)))
        if missing:
            lines.append(f"{len(missing)} params not in the checkpoint: " + ", ".join(missing))
        if mismatched:
            lines.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched))
        if not_float:
            lines.append(f"{len(not_float)} float params given as non-float tensors: "
                         + "; ".join(not_float))  # fmt: skip
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(lines))
    return source


def place(value: np.ndarray, like) -> jax.Array:
    """A host array as a jax array: with `like.sharding` (a ShapeDtypeStruct's) when it has
    one, built shard by shard from `value`; else on the default device."""
    sharding = getattr(like, "sharding", None)
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _fill(
    source: Mapping[tuple[str, ...], str],
    expected: Mapping,
    fetch: Callable[[str], np.ndarray],
    check_finite: bool,
) -> dict:
    """Fetches, checks, casts and places one tensor at a time, in `source`'s order; the host
    copy of each is dropped before the next is fetched."""
    want = _flatten(expected)
    got: dict[tuple[str, ...], jax.Array] = {}
    bad: list[str] = []
    for path, key in source.items():
        value = fetch(key)
        if check_finite and not all_finite(value):
            bad.append(key)
            got.clear()  # the load fails: keep scanning, free what was placed
        if bad:
            continue
        like = want[path]
        value = to_flax(path[-1], value)
        if _is_float(value) and value.dtype != like.dtype:
            value = value.astype(like.dtype)
        got[path] = place(value, like)
        del value
    if bad:
        shown = ", ".join(bad[:_SHOWN_KEYS]) + (
            f" and {len(bad) - _SHOWN_KEYS} more" if len(bad) > _SHOWN_KEYS else ""
        )
        raise CheckpointError(
            f"{len(bad)} checkpoint tensors hold NaN or inf: {shown}; the weights are "
            "damaged (load with check_finite=False to accept them)"
        )
    return _unflatten({p: got[p] for p in want})


def map_checkpoint(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping,
    table: Iterable[tuple[str, str]],
    aliases: Mapping[tuple[str, ...], tuple[str, ...]] | None = None,
    check_finite: bool = True,
) -> dict:
    """Maps HF tensors onto a Flax param tree whose shapes are `expected`.

    Args:
      tensors: HF key -> array.
      expected: nested dicts of ShapeDtypeStruct (jax.eval_shape of the module's init, e.g.
        vicrop_jax.models.llava.abstract_params); floating-point params come back in their
        leaf's dtype, and with the leaf's `sharding` when it has one (`place`).
      table: ordered (regex, replacement) pairs normalising key prefixes.
      aliases: Flax paths that may be filled by a checkpoint key but need not be (e.g. a tied
        lm_head saved anyway): path -> the param it must equal, in the same layout.
      check_finite: refuse tensors holding NaN or inf (`nonfinite_keys`).

    Raises:
      CheckpointError listing every unused key, missing param, shape mismatch and non-float
      tensor for a float param; or, after those, the tensors that hold NaN or inf.
    """
    source = _match(tensors, expected, table, aliases or {}, tensors.__getitem__)
    return _fill(source, expected, tensors.__getitem__, check_finite)


_HEAD = ("lm_head", "kernel")
_EMBEDDING = ("language_model", "embed_tokens", "embedding")


def load_params(
    path: str, expected: Mapping, table: Iterable[tuple[str, str]], check_finite: bool = True
) -> dict:
    """Reads a checkpoint directory and maps it onto `expected` (a family's abstract params),
    streamed: every check that needs only shapes and dtypes runs on the safetensors headers
    before any tensor is read, then tensors are read one at a time in file order, checked,
    cast to their leaf's dtype and placed (`map_checkpoint`), so the host holds the params
    plus one tensor in flight, not a second copy of the checkpoint.

    A tree with an input embedding and no lm_head is a tied model (the head reuses the
    embedding): an lm_head saved anyway must equal the embedding, and is then not an unused key.
    check_finite: refuse tensors holding NaN or inf (map_checkpoint).
    """
    want = _flatten(expected)
    aliases = {_HEAD: _EMBEDDING} if _EMBEDDING in want and _HEAD not in want else {}
    entries = checkpoint_entries(path)
    shapes = {key: e.stand_in() for key, e in entries.items()}

    def fetch(key):
        return read_tensor(entries[key])

    source = _match(shapes, expected, table, aliases, fetch)
    order = sorted(source.items(), key=lambda kv: (entries[kv[1]].file, entries[kv[1]].offset))
    return _fill(dict(order), expected, fetch, check_finite)


def hf_key(path: tuple[str, ...]) -> str:
    """Flax path -> the key transformers 5 writes with save_pretrained (LLaVA, InstructBLIP):
    `layers_N`/`layer_N` -> `.N`, kernel/scale/embedding -> weight, and the language model
    under `language_model.model` / `language_model.lm_head`."""
    parts = [re.sub(r"^(layers?)_(\d+)$", r"\1.\2", p) for p in path]  # not layer_norm1
    if parts[-1] in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    if parts[0] == "language_model":
        parts[0] = "language_model.model"
    elif parts[0] == "lm_head":
        parts[0] = "language_model.lm_head"
    return ".".join(parts)


def export_tensors(params: Mapping, key_of: callable = hf_key) -> dict[str, np.ndarray]:
    """Flax params -> HF tensors; key_of maps a Flax path to the HF key."""
    out = {}
    for path, value in _flatten(params).items():
        arr = np.asarray(jax.device_get(value))
        out[key_of(path)] = np.ascontiguousarray(from_flax(path[-1], arr))
    return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str, config: dict) -> None:
    """Writes model.safetensors and config.json into directory `path`."""
    os.makedirs(path, exist_ok=True)
    weights = os.path.join(path, "model.safetensors")
    save_file(dict(tensors), weights, metadata={"format": "pt"})
    os.chmod(weights, 0o644)  # package data: readable by all (the writer may create it 0600)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
