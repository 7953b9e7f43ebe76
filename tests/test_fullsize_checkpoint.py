"""bench.fullsize_checkpoint: the hub's key layout and shapes, streamed shards, the cache.

Small dimensions here (the 7B writer is exercised by tests/test_fullsize.py, opt-in)."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from bench import fullsize_checkpoint as fc
from vicrop_jax.models.llava import PRESETS, abstract_params


def small_config(dtype="float32"):
    cfg = fc.hub_config(text_layers=2, vision_layers=3, dtype=dtype)
    cfg["text_config"].update(
        hidden_size=40, intermediate_size=53, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97,
    )  # fmt: skip
    cfg["vision_config"].update(hidden_size=28, intermediate_size=37, num_attention_heads=4,
                                image_size=35, patch_size=7)  # fmt: skip
    cfg["image_seq_length"] = 25
    return cfg


def test_7b_specs_are_the_preset_and_three_shards():
    specs = fc.tensor_specs(fc.hub_config())
    ours = abstract_params(PRESETS["llava-1.5-7b"])
    count = lambda shapes: sum(int(np.prod(s)) for s in shapes)  # noqa: E731
    assert len(specs) == len(jax.tree.leaves(ours))
    n = count(s for _, s, _ in specs)
    assert n == count(x.shape for x in jax.tree.leaves(ours))
    assert n == 7_063_427_072  # HF's count on the meta device (BUILD_NOTES.md)
    shards = fc.plan_shards([(k, 2 * int(np.prod(s))) for k, s, _ in specs], 5 * 10**9)
    assert len(shards) == 3  # the hub's model-0000{1,2,3}-of-00003.safetensors


def test_streamed_shards_load_in_torch_and_ours(tmp_path):
    pytest.importorskip("torch")
    from transformers import LlavaForConditionalGeneration

    from vicrop_jax.loading import load_params, parse_config

    cfg = small_config()
    d = str(tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    r = fc.write_weights(d, cfg, "float32", seed=5, shard_bytes=60_000)
    assert len(r["files"]) > 2
    with open(os.path.join(d, fc.INDEX)) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(r["files"])
    assert index["metadata"]["total_size"] == r["total_size"]
    hf, info = LlavaForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    q = "language_model.model.layers.1.self_attn.k_proj.weight"
    want = fc.make_tensor(q, (20, 40), "normal", "float32", 5)
    got = hf.model.language_model.layers[1].self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    assert abs(want.std() - fc.INIT_STD) < 0.003
    params = load_params(d, parse_config(cfg))
    kernel = params["language_model"]["layers_1"]["self_attn"]["k_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), want.T)
    ln = params["vision_tower"]["encoder"]["layers_2"]["layer_norm1"]
    assert (np.asarray(ln["scale"]) == 1).all() and (np.asarray(ln["bias"]) == 0).all()


def test_bfloat16_tensors_and_independent_seeds(tmp_path):
    path = str(tmp_path / "x.safetensors")
    entries = [("a.weight", (3, 5), "BF16"), ("b.bias", (7,), "BF16")]
    make = lambda n: fc.make_tensor(n, dict((k, s) for k, s, _ in entries)[n], "normal",  # noqa: E731
                                    "bfloat16", 1)  # fmt: skip
    size = fc.write_safetensors(path, entries, make)
    assert size == os.path.getsize(path)
    with safe_open(path, framework="numpy") as f:
        a = f.get_tensor("a.weight")
    assert a.dtype == ml_dtypes.bfloat16 and a.shape == (3, 5)
    np.testing.assert_array_equal(a, make("a.weight"))
    assert not np.array_equal(make("a.weight"), fc.make_tensor("a.weight", (3, 5), "normal",
                                                               "bfloat16", 2))  # fmt: skip
