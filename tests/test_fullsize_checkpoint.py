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


def small_blip_config():
    cfg = fc.blip_hub_config(text_layers=2, vision_layers=2, qformer_layers=3, dtype="float32")
    cfg["text_config"].update(hidden_size=40, intermediate_size=53, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=10, vocab_size=97,
                              pad_token_id=3)  # fmt: skip
    cfg["vision_config"].update(hidden_size=24, intermediate_size=37, num_attention_heads=2,
                                image_size=35, patch_size=7)  # fmt: skip
    cfg["qformer_config"].update(hidden_size=30, intermediate_size=41, num_attention_heads=3,
                                 encoder_hidden_size=24, max_position_embeddings=64,
                                 vocab_size=67)  # fmt: skip
    cfg.update(num_query_tokens=7, image_token_index=90)
    return cfg


def test_instructblip_7b_specs_count_and_shards():
    specs = fc.tensor_specs(fc.blip_hub_config())
    # HF's count on the meta device (tests/test_instructblip_parity.py); the key layout is
    # checked at small size below.
    assert sum(int(np.prod(s)) for _, s, _ in specs) == 7_913_726_720
    # float32 (the hub's dtype) in 10 GB shards: 4 files, as the hub's.
    shards = fc.plan_shards([(k, 4 * int(np.prod(s))) for k, s, _ in specs], 10 * 10**9)
    assert len(shards) == 4
    wide = fc.variant_config("instructblip", "wide2")
    qformer = {**fc.QFORMER_DEFAULTS, **wide["qformer_config"]}
    assert (wide["text_config"]["num_hidden_layers"], wide["vision_config"]["num_hidden_layers"],
            qformer["num_hidden_layers"]) == (2, 2, 12)  # fmt: skip


def test_instructblip_shards_load_in_torch_and_ours(tmp_path):
    pytest.importorskip("torch")
    from transformers import InstructBlipForConditionalGeneration

    from vicrop_jax.loading import load_params, parse_config

    cfg = small_blip_config()
    d = str(tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    r = fc.write_weights(d, cfg, "float32", seed=5, shard_bytes=40_000)
    assert len(r["files"]) > 2
    hf, info = InstructBlipForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    bias = hf.vision_model.encoder.layers[1].self_attn.qkv.bias.detach().numpy()
    assert (bias[24:48] == 0).all() and (bias[:24] != 0).all() and (bias[48:] != 0).all()
    q = "qformer.encoder.layer.2.crossattention.attention.key.weight"
    want = fc.make_tensor(q, (30, 24), "normal", "float32", 5)
    got = hf.qformer.encoder.layer[2].crossattention.attention.key.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    params = load_params(d, parse_config(cfg))
    kernel = params["qformer"]["encoder"]["layer_2"]["crossattention"]["attention"]["key"]
    np.testing.assert_array_equal(np.asarray(kernel["kernel"]), want.T)
    np.testing.assert_array_equal(
        np.asarray(params["language_model"]["layers_1"]["self_attn"]["k_proj"]["kernel"]),
        hf.language_model.model.layers[1].self_attn.k_proj.weight.detach().numpy().T,
    )


def test_qformer_tokenizer_has_berts_ids():
    tok = fc.build_qformer_tokenizer()
    assert len(tok) == fc.QFORMER_VOCAB
    ids = tok("Question: What is written on the red circle? Short answer:")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and 100 not in ids  # [CLS] ... [SEP], no [UNK]
    words = tok.convert_ids_to_tokens(ids[1:-1])
    assert words[:3] == ["question", ":", "what"] and words[-3:] == ["short", "answer", ":"]
    assert tok("zebra")["input_ids"] == [101, 100, 102]
    assert (tok.pad_token_id, tok.bos_token_id) == (0, fc.QFORMER_VOCAB - 1)
