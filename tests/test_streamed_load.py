"""Streamed checkpoint loading (convert.checkpoint.load_params): every shape and dtype check
runs on the safetensors headers before any tensor is read; tensors are then read, cast and
placed one at a time, each with the sharding its expected leaf carries; lying headers and
indexes fail with one line naming the file and key.
"""

from __future__ import annotations

import json
import os
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bench import fullsize_checkpoint as fc
from convert import checkpoint
from convert import llava as llava_convert
from convert.checkpoint import CheckpointError
from vicrop_jax.loading import parse_config
from vicrop_jax.models.llava import abstract_params

KEY = "language_model.model.layers.1.mlp.up_proj.weight"  # [53, 40] in the file


def small_config(dtype="float32", text_layers=2, hidden=40, vocab=97):
    cfg = fc.hub_config(text_layers=text_layers, vision_layers=2, dtype=dtype)
    cfg["text_config"].update(
        hidden_size=hidden, intermediate_size=53 if hidden == 40 else 2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
    )  # fmt: skip
    cfg["vision_config"].update(hidden_size=28, intermediate_size=37, num_attention_heads=4,
                                image_size=35, patch_size=7)  # fmt: skip
    cfg["image_seq_length"] = 25
    return cfg


def write(d, cfg, dtype="float32", shard_bytes=60_000) -> str:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    fc.write_weights(d, cfg, dtype, seed=3, shard_bytes=shard_bytes)
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = small_config()
    return write(str(tmp_path_factory.mktemp("streamed") / "ckpt"), cfg), cfg


def _expected(cfg, dtype=jnp.float32):
    return abstract_params(parse_config(cfg), dtype)


def _shard_of(d, key) -> str:
    with open(os.path.join(d, fc.INDEX)) as f:
        return os.path.join(d, json.load(f)["weight_map"][key])


def _rewrite_header(file, edit) -> None:
    """Edits a file's header JSON in place, padded to its length (data offsets unchanged)."""
    with open(file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = edit(json.loads(f.read(n)))
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        f.seek(8)
        f.write(text.ljust(n))


def test_tensors_are_read_and_placed_one_at_a_time_in_file_order(ckpt, monkeypatch):
    d, cfg = ckpt
    calls = []
    read, place = checkpoint.read_tensor, checkpoint.place

    def spy_read(entry):
        calls.append(("read", entry.file, entry.offset))
        return read(entry)

    def spy_place(value, like):
        calls.append(("place",))
        return place(value, like)

    monkeypatch.setattr(checkpoint, "read_tensor", spy_read)
    monkeypatch.setattr(checkpoint, "place", spy_place)
    params = llava_convert.load_params(d, _expected(cfg, jnp.bfloat16))
    n = len(jax.tree.leaves(params))
    assert [c[0] for c in calls] == ["read", "place"] * n
    reads = [c[1:] for c in calls if c[0] == "read"]
    assert reads == sorted(reads) and len({f for f, _ in reads}) > 2  # shard by shard
    kernel = params["language_model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    want = fc.make_tensor(KEY, (53, 40), "normal", "float32", 3).T.astype(jnp.bfloat16)
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel), want)


def test_leaves_come_back_with_the_expected_sharding(ckpt):
    d, cfg = ckpt
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    split, whole = NamedSharding(mesh, PartitionSpec("x")), NamedSharding(mesh, PartitionSpec())
    expected = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=split if s.ndim else whole),
        _expected(cfg),
    )
    params = llava_convert.load_params(d, expected)
    plain = llava_convert.load_params(d, _expected(cfg))
    for got, want, like in zip(
        jax.tree.leaves(params), jax.tree.leaves(plain), jax.tree.leaves(expected), strict=True
    ):
        assert got.sharding == like.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_shape_checks_read_no_tensor(ckpt, tmp_path, monkeypatch):
    d, cfg = ckpt
    bad = dict(cfg, text_config=dict(cfg["text_config"], intermediate_size=54))

    def no_reads(entry):
        raise AssertionError(f"read {entry.key} before the checks")

    monkeypatch.setattr(checkpoint, "read_tensor", no_reads)
    with pytest.raises(CheckpointError, match=f"shape mismatches: .*{KEY}: checkpoint"):
        llava_convert.load_params(d, _expected(bad))


def test_a_header_that_lies_about_a_shape_names_file_and_key(ckpt, tmp_path):
    import shutil

    d = str(tmp_path / "lie")
    shutil.copytree(ckpt[0], d)
    file = _shard_of(d, KEY)

    def lie(header):
        header[KEY]["shape"] = [53, 41]
        return header

    _rewrite_header(file, lie)
    with pytest.raises(CheckpointError) as e:
        llava_convert.load_params(d, _expected(ckpt[1]))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{file}: the header gives tensor {KEY!r} shape [53, 41] F32 (8692 bytes)" in msg
    assert "but 8480 bytes of data" in msg


def test_an_index_key_that_no_shard_holds_names_it(ckpt, tmp_path):
    import shutil

    d = str(tmp_path / "index")
    shutil.copytree(ckpt[0], d)
    index = os.path.join(d, fc.INDEX)
    with open(index) as f:
        data = json.load(f)
    shard = data["weight_map"][KEY]
    data["weight_map"]["language_model.model.layers.7.mlp.up_proj.weight"] = shard
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(CheckpointError, match="maps key 'language_model.model.layers.7.mlp"
                       f".*{shard}, but no shard holds it"):  # fmt: skip
        llava_convert.load_params(d, _expected(ckpt[1]))


# ---------------------------------------------------------------- peak host memory

_MEASURE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from vicrop_jax.loading import checked_abstract_params, load_params, parse_config

def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

jnp.asarray(np.ones(8)).block_until_ready()  # the backend is up before the baseline
path = sys.argv[1]
with open(path + "/config.json") as f:
    config = parse_config(json.load(f))
checked_abstract_params(config, jnp.bfloat16)  # modules imported and traced once
before = status_bytes("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
params = jax.block_until_ready(load_params(path, config, jnp.bfloat16))
loaded = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"growth": status_bytes("VmHWM") - before, "loaded": loaded}))
"""
MIB = 1 << 20


def _peak_growth(path: str) -> dict:
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _MEASURE, path], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    print(f"{path}: {time.perf_counter() - t0:.1f} s")
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("file_dtype", ["bfloat16", "float32"])
def test_peak_memory_grows_once_with_the_params(tmp_path, file_dtype):
    """Peak RSS growth while loading as bfloat16, at two depths: its slope over the loaded
    bytes is about 1 (the params, one tensor in flight), where reading the whole checkpoint
    before placing it gives 2 (bfloat16 files) or 3 (float32 files cast to bfloat16)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"this kernel cannot reset the peak RSS: {e}")
    runs = []
    for layers in (1, 6):  # 24 and 82 MB of bfloat16 params
        cfg = small_config(file_dtype, text_layers=layers, hidden=768, vocab=4000)
        d = write(str(tmp_path / f"l{layers}"), cfg, file_dtype, shard_bytes=30 * MIB)
        runs.append(_peak_growth(d))
    (small, large) = runs
    slope = (large["growth"] - small["growth"]) / (large["loaded"] - small["loaded"])
    assert 0.7 < slope <= 1.3, runs
    for r in runs:
        assert r["growth"] <= 1.3 * r["loaded"] + 48 * MIB, r


_MEASURE_SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from vicrop_jax.loading import checked_abstract_params, load_params, param_specs, parse_config
from vicrop_jax.sharding import make_mesh, shard_bytes

def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

assert len(jax.devices()) == 8, jax.devices()
jnp.asarray(np.ones(8)).block_until_ready()
path = sys.argv[1]
with open(path + "/config.json") as f:
    config = parse_config(json.load(f))
abstract = checked_abstract_params(config, jnp.float32)
mesh = make_mesh((1, 8))
before = status_bytes("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
params = jax.block_until_ready(load_params(path, config, jnp.float32, mesh=mesh))
growth = status_bytes("VmHWM") - before
specs = jax.tree.leaves(param_specs(config, abstract),
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
per_device, planned, whole_split = {}, {}, []
for x, spec in zip(jax.tree.leaves(params), specs, strict=True):
    for s in x.addressable_shards:
        per_device[str(s.device)] = per_device.get(str(s.device), 0) + s.data.nbytes
        planned[str(s.device)] = planned.get(str(s.device), 0) + shard_bytes(
            x.shape, x.dtype, spec, {"data": 1, "model": 8})
        if "model" in spec and s.data.shape == x.shape:
            whole_split.append(str(spec))
sizes = [x.nbytes for x in jax.tree.leaves(params)]
print(json.dumps({"growth": growth, "per_device": per_device, "planned": planned,
                  "whole_split": whole_split, "full": sum(sizes), "largest": max(sizes)}))
"""


def test_a_sharded_load_builds_each_device_its_shards(tmp_path):
    """A float32 checkpoint (87 MiB, tensors up to 12 MiB) loaded on a (1, 8) mesh of 8 forced
    CPU devices: each device holds its planned shards (no device a whole split param), and
    the peak RSS growth stays below what the devices hold plus the largest tensor (all 8
    devices share this host's memory: the split params once, the replicated ones 8 times;
    reading the whole checkpoint before splitting it would add its 87 MiB)."""
    import subprocess
    import sys

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"this kernel cannot reset the peak RSS: {e}")
    cfg = small_config("float32", text_layers=3, hidden=768, vocab=4000)
    cfg["text_config"].update(num_attention_heads=16, num_key_value_heads=8)
    d = write(str(tmp_path / "sharded"), cfg, "float32", shard_bytes=30 * MIB)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", _MEASURE_SHARDED, d], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(r["per_device"]) == 8 and r["per_device"] == r["planned"], r
    assert not r["whole_split"], r["whole_split"]
    held = sum(r["per_device"].values())
    assert max(r["per_device"].values()) < r["full"] / 4, r  # the split params: 1/8 each
    assert r["growth"] <= held + r["largest"] + 32 * MIB, r
