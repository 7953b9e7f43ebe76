"""Damaged checkpoints and configs fail with one CheckpointError line, before anything large
is read or allocated: empty, truncated or foreign safetensors files, sharded checkpoints with
a missing shard or a damaged index, config counts of the wrong type, sign or consistency,
configs too large for the host, non-float tensors for float params, NaN and inf weights; and
`python -m eval.run` prints them as one `error:` line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import vicrop_jax
from convert.checkpoint import CheckpointError, check_safetensors_file, read_safetensors
from tests.conftest import FAST_COMPILE
from vicrop_jax import loading
from vicrop_jax.loading import parse_config
from vicrop_jax.testing import (
    hf_config_dict,
    instructblip_config_dict,
    make_random_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "vicrop_jax", "assets", "demo")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random LLaVA checkpoint (no torch)."""
    return make_random_checkpoint(str(tmp_path_factory.mktemp("errors") / "tiny"))


def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _weights(d) -> str:
    return os.path.join(d, "model.safetensors")


def _rewrite(d, fn) -> None:
    tensors = fn(load_file(_weights(d)))
    save_file(tensors, _weights(d), metadata={"format": "pt"})


def _shard(d) -> str:
    """Splits model.safetensors into two shards and a model.safetensors.index.json."""
    tensors = load_file(_weights(d))
    os.remove(_weights(d))
    keys = sorted(tensors)
    weight_map = {k: SHARDS[i >= len(keys) // 2] for i, k in enumerate(keys)}
    for name in SHARDS:
        part = {k: tensors[k] for k in keys if weight_map[k] == name}
        save_file(part, os.path.join(d, name), metadata={"format": "pt"})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return d


def _truncate(file, size) -> None:
    with open(file, "r+b") as f:
        f.truncate(size)


def _one_line_error(d, match, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        vicrop_jax.load_model(d, processor=False, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert match in msg, msg
    return msg


def _write_config(d, hf) -> None:
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf, f)


# ---------------------------------------------------------------- safetensors files


def test_sharded_checkpoint_loads_as_the_single_file(ckpt, tmp_path):
    d = _shard(_copy(ckpt, tmp_path / "sharded"))
    whole = vicrop_jax.load_model(ckpt, processor=False).params
    sharded = vicrop_jax.load_model(d, processor=False).params
    assert jax.tree.structure(whole) == jax.tree.structure(sharded)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "size, words",
    [
        (0, "is empty (0 bytes)"),
        (5, "is truncated: 5 bytes, no complete header"),
        (40, "is truncated: 40 bytes, its header alone needs"),
        (-100, "is truncated: "),  # the tensor data cut short
    ],
)
def test_empty_or_truncated_file_is_one_line_naming_it(ckpt, tmp_path, size, words):
    d = _copy(ckpt, tmp_path / "cut")
    file = _weights(d)
    _truncate(file, size if size >= 0 else os.path.getsize(file) + size)
    msg = _one_line_error(d, f"{file} {words}")
    if size < 0:
        assert "bytes of tensor data, its header describes" in msg and "(100 missing)" in msg


@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("cut", ["empty", "truncated"])
def test_one_damaged_shard_is_one_line_naming_it(ckpt, tmp_path, shard, cut):
    d = _shard(_copy(ckpt, tmp_path / "sharded"))
    file = os.path.join(d, shard)
    _truncate(file, 0 if cut == "empty" else os.path.getsize(file) - 1)
    _one_line_error(d, f"{file} is {cut}")


def test_missing_shard_and_damaged_index(ckpt, tmp_path):
    d = _shard(_copy(ckpt, tmp_path / "sharded"))
    index = os.path.join(d, "model.safetensors.index.json")
    os.remove(os.path.join(d, SHARDS[1]))
    _one_line_error(d, f"{index} names shards that are missing: ['{SHARDS[1]}']")
    with open(index, "w") as f:
        f.write('{"weight_map": {"a": "model-00001')
    _one_line_error(d, f"{index} is not valid JSON")
    with open(index, "w") as f:
        json.dump({"metadata": {}}, f)
    _one_line_error(d, f'{index} has no "weight_map" object')
    with open(index, "w") as f:
        json.dump({"weight_map": {"a": 3}}, f)
    _one_line_error(d, f"{index} names shards that are not file names: 3")


def test_foreign_files_are_refused_by_their_header(tmp_path):
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(CheckpointError, match="is a Git LFS pointer .*git lfs pull"):
        check_safetensors_file(str(lfs))
    html = tmp_path / "page.safetensors"
    html.write_text("<!DOCTYPE html><html><body>rate limited</body></html>")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        check_safetensors_file(str(html))
    bad = tmp_path / "header.safetensors"
    bad.write_bytes((12).to_bytes(8, "little") + b"{not json!!}")
    with pytest.raises(CheckpointError, match="has a damaged header"):
        check_safetensors_file(str(bad))


def test_demo_and_tiny_headers_pass(ckpt):
    for d in (DEMO, ckpt):
        check_safetensors_file(_weights(d))
    assert len(read_safetensors(DEMO)) > 0


# ---------------------------------------------------------------- config sanity


def _set(hf, dotted, value) -> dict:
    hf = json.loads(json.dumps(hf))
    *outer, last = dotted.split(".")
    node = hf
    for k in outer:
        node = node[k]
    node[last] = value
    return hf


BAD_COUNTS = [
    ("text_config.num_hidden_layers", "32", "must be a positive int, got '32'"),
    ("text_config.num_hidden_layers", 0, "must be a positive int, got 0"),
    ("text_config.num_attention_heads", -4, "must be a positive int, got -4"),
    ("text_config.vocab_size", True, "must be a positive int, got True"),
    ("text_config.intermediate_size", 53.0, "must be a positive int, got 53.0"),
    ("text_config.num_key_value_heads", "2", "must be a positive int or null, got '2'"),
    ("text_config.vocab_size", 2**40, "must be below 2**31, got 1099511627776"),
    ("text_config.pad_token_id", "3", "must be an int or null, got '3'"),
    ("vision_config.hidden_size", 28.5, "must be a positive int, got 28.5"),
    ("vision_config.image_size", "35", "must be a positive int, got '35'"),
    ("vision_config.patch_size", 0, "must be a positive int, got 0"),
    ("vision_config.num_hidden_layers", False, "must be a positive int, got False"),
    ("image_seq_length", -1, "must be a positive int, got -1"),
    ("image_token_index", 4.0, "must be an int, got 4.0"),
]
INCONSISTENT = [
    ("text_config.hidden_size", 42,
     "text_config.hidden_size: 42 is not a multiple of text_config.num_attention_heads (4)"),
    ("text_config.num_key_value_heads", 3,
     "text_config.num_attention_heads: 4 is not a multiple of text_config.num_key_value_heads (3)"),
    ("vision_config.image_size", 36,
     "vision_config.image_size: 36 is not a multiple of vision_config.patch_size (7)"),
    ("vision_config.num_attention_heads", 3,
     "vision_config.hidden_size: 28 is not a multiple of vision_config.num_attention_heads (3)"),
]  # fmt: skip


@pytest.mark.parametrize("field, value, words", BAD_COUNTS + INCONSISTENT)
def test_bad_config_counts_name_the_field(field, value, words):
    hf = _set(hf_config_dict(), field, value)
    with pytest.raises(CheckpointError) as e:
        parse_config(hf)
    msg = str(e.value)
    assert "\n" not in msg, msg
    prefix = "config.json " if words.startswith(field.split(".")[0]) else f"config.json {field}: "
    assert prefix + words in msg, msg


def test_instructblip_counts_and_consistency_name_the_field():
    hf = instructblip_config_dict()
    for field, value, words in [
        ("num_query_tokens", 0, "config.json num_query_tokens: must be a positive int, got 0"),
        ("num_query_tokens", "7", "config.json num_query_tokens: must be a positive int, got '7'"),
        ("qformer_config.num_attention_heads", 7,
         "config.json qformer_config.hidden_size: 30 is not a multiple of "
         "qformer_config.num_attention_heads (7)"),
        ("qformer_config.cross_attention_frequency", 0,
         "config.json qformer_config.cross_attention_frequency: must be a positive int, got 0"),
        ("vision_config.image_size", 34,
         "config.json vision_config.image_size: 34 is not a multiple of vision_config.patch_size"),
        ("qformer_config", [], "config.json qformer_config: must be a JSON object, got a list"),
    ]:  # fmt: skip
        with pytest.raises(
            CheckpointError, match="^" + words.replace("(", r"\(").replace(")", r"\)")
        ):
            parse_config(_set(hf, field, value))


def test_good_configs_still_parse():
    """Null optional counts, an explicit head_dim that does not split hidden_size, defaults."""
    parse_config(_set(hf_config_dict(), "text_config.num_key_value_heads", None))
    cfg = parse_config(
        _set(_set(hf_config_dict(), "text_config.hidden_size", 42), "text_config.head_dim", 10)
    )
    assert (cfg.text_config.hidden_size, cfg.text_config.head_dim) == (42, 10)
    parse_config(instructblip_config_dict())
    with open(os.path.join(DEMO, "config.json")) as f:
        parse_config(json.load(f))
    with pytest.raises(CheckpointError, match="config.json must be a JSON object, got a list"):
        parse_config([])


def test_config_errors_come_before_the_weights_are_read(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "badcfg")
    _truncate(_weights(d), 0)  # would be the error if the weights were looked at first
    _write_config(d, _set(hf_config_dict(), "text_config.num_hidden_layers", "32"))
    _one_line_error(d, "config.json text_config.num_hidden_layers: must be a positive int")


def test_damaged_generation_config_names_the_file(tmp_path):
    d = str(tmp_path / "blip")
    os.makedirs(d)
    _write_config(d, instructblip_config_dict())  # its family reads generation_config.json
    gen = os.path.join(d, "generation_config.json")
    for text in ('{"eos_token_id": ', "[2]"):
        with open(gen, "w") as f:
            f.write(text)
        _one_line_error(d, f"{gen} is not a JSON object")


# ---------------------------------------------------------------- host memory


def test_a_million_layers_is_refused_in_seconds_by_its_size(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "deep")
    os.remove(_weights(d))  # the size is checked before any weights file is looked at
    for layers in (10**6, 10**9):
        _write_config(d, _set(hf_config_dict(), "text_config.num_hidden_layers", layers))
        t0 = time.perf_counter()
        msg = _one_line_error(d, f"config.json text_config.num_hidden_layers = {layers}: ")
        assert time.perf_counter() - t0 < 60
        assert "the model's params need" in msg and "as float32 but the host has" in msg


def test_layer_extrapolation_matches_the_traced_size():
    hf = _set(_set(instructblip_config_dict(), "qformer_config.num_hidden_layers", 16),
              "text_config.num_hidden_layers", 9)  # fmt: skip
    cfg = parse_config(hf)
    family = vicrop_jax.families.family_of(cfg)
    traced = loading.param_bytes(family.abstract_params(cfg, np.float32))
    deep = loading._layer_counts(cfg)
    assert loading._estimate_bytes(family, cfg, np.float32, deep) == traced


def test_params_larger_than_available_memory_name_the_largest(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "available_host_bytes", lambda: 1 << 10)
    d = _copy(ckpt, tmp_path / "small_host")
    os.remove(_weights(d))
    msg = _one_line_error(d, "config.json: the model's params need ")
    assert "but the host has 1.0 KiB available (the largest param: " in msg
    monkeypatch.setattr(loading, "available_host_bytes", lambda: None)  # unknown: no check
    vicrop_jax.load_model(ckpt, processor=False)


def test_available_host_bytes_is_known_here():
    avail = loading.available_host_bytes()
    assert avail is None or avail > 0


# ---------------------------------------------------------------- tensor dtypes and values


def test_integer_tensor_for_a_float_param_names_the_key(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "int")
    key = "language_model.model.layers.1.self_attn.q_proj.weight"
    _rewrite(d, lambda t: {**t, key: t[key].astype(np.int32)})
    with pytest.raises(CheckpointError) as e:
        vicrop_jax.load_model(d, processor=False)
    assert f"1 float params given as non-float tensors: {key}: int32 (as " in str(e.value)


def test_nan_and_inf_weights_are_named_and_can_be_accepted(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "nan")
    nan_key = "language_model.model.layers.0.mlp.up_proj.weight"
    inf_key = "vision_tower.embeddings.class_embedding"

    def damage(t):
        t = dict(t)
        t[nan_key] = t[nan_key].copy()
        t[nan_key][3, 5] = np.nan
        t[inf_key] = t[inf_key].copy()
        t[inf_key][-1] = -np.inf
        return t

    _rewrite(d, damage)
    msg = _one_line_error(d, "2 checkpoint tensors hold NaN or inf: ")
    assert nan_key in msg and inf_key in msg and "check_finite=False" in msg
    model = vicrop_jax.load_model(d, processor=False, check_finite=False)
    assert np.isnan(np.asarray(model.params["language_model"]["layers_0"]["mlp"]["up_proj"]
                               ["kernel"])).sum() == 1  # fmt: skip
    # Many: the first five named, the rest counted.
    _rewrite(d, lambda t: {k: np.full_like(v, np.nan) for k, v in t.items()})
    msg = _one_line_error(d, "checkpoint tensors hold NaN or inf: ")
    assert msg.count(", ") == 4 and " more; " in msg


def test_demo_model_loads_with_the_checks(ckpt):
    model = vicrop_jax.load_model(DEMO)
    assert model.config.text_config.num_hidden_layers == 4
    vicrop_jax.load_model(ckpt, processor=False)


# ---------------------------------------------------------------- the command line


_DRIVER = r"""
import contextlib, io, json, sys
from absl import flags
import eval.run
from eval import cli
data, out, *models = sys.argv[1:]
main = cli.checked(eval.run.main, cli.expected_errors())
for i, model in enumerate(models):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run", f"--model={model}", "--task=gqa", f"--data_json={data}/data.json",
                 f"--image_root={data}/images", f"--output_dir={out}/{i}", "--noprogress"])
    err, code = io.StringIO(), None
    with contextlib.redirect_stderr(err):
        try:
            main(["run"])
        except SystemExit as e:
            code = e.code
    print(json.dumps({"code": code, "stderr": err.getvalue()}))
"""


def test_eval_run_prints_each_as_one_error_line(ckpt, tmp_path):
    from tests.test_eval_datasets import write_unified

    write_unified(str(tmp_path / "data"), n=1)
    cut = _shard(_copy(ckpt, tmp_path / "cut"))
    _truncate(os.path.join(cut, SHARDS[1]), 100)
    deep = _copy(ckpt, tmp_path / "deep")
    _write_config(deep, _set(hf_config_dict(), "text_config.num_hidden_layers", 10**6))
    text = _copy(ckpt, tmp_path / "text")
    _write_config(text, _set(hf_config_dict(), "text_config.num_hidden_layers", "32"))
    nan = _copy(ckpt, tmp_path / "nan")
    _rewrite(nan, lambda t: {k: np.full_like(v, np.inf) for k, v in t.items()})
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = FAST_COMPILE  # of a caller's XLA flags, only the suite's fast compile
    p = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(tmp_path / "data"), str(tmp_path / "out"),
         cut, deep, text, nan],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    expected = [
        f"error: {os.path.join(cut, SHARDS[1])} is truncated: 100 bytes",
        "error: config.json text_config.num_hidden_layers = 1000000: the model's params need",
        "error: config.json text_config.num_hidden_layers: must be a positive int, got '32'",
        "error: ",
    ]
    assert len(results) == len(expected), p.stdout
    for r, words in zip(results, expected, strict=True):
        assert r["code"] == 2, r
        errors = [line for line in r["stderr"].splitlines() if line.startswith("error: ")]
        last = r["stderr"].strip().splitlines()[-1]  # progress lines come first
        assert errors == [last] and last.startswith(words), r["stderr"]
        assert "Traceback" not in r["stderr"]
    assert "checkpoint tensors hold NaN or inf" in results[3]["stderr"].splitlines()[-1]
