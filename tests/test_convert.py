"""Checkpoint loading, key layouts, export, orbax, presets and bad inputs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import vicrop_jax
from convert import llava as llava_convert
from convert.checkpoint import CheckpointError
from convert.orbax_io import restore_params, save_params
from tests.hf_reference import make_tiny_llava
from vicrop_jax.models.llama import LlamaConfig, rope_inv_freq
from vicrop_jax.models.llava import PRESETS, LlavaConfig, abstract_params


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = fn(load_file(f))
    os.remove(f)
    save_file(tensors, f, metadata={"format": "pt"})


def _max_diff(a, b):
    return max(
        float(jnp.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(
    "prefixes",
    [
        # transformers >= 4.52 in-memory layout
        {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
         "vision_tower.": "model.vision_tower.",
         "multi_modal_projector.": "model.multi_modal_projector."},
        # hub files (llava-hf/llava-1.5-7b-hf): vision keys under vision_model
        {"vision_tower.": "vision_tower.vision_model."},
    ],
)  # fmt: skip
def test_both_key_layouts_load_identically(tiny_llava, tmp_path, prefixes):
    model, _ = tiny_llava

    def rename(t):
        out = {}
        for k, v in t.items():
            for old, new in prefixes.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            out[k] = v
        return out

    d = _copy(model.path, tmp_path / "ckpt")
    _rewrite(d, rename)
    other = vicrop_jax.load_model(d, processor=False)
    assert _max_diff(other.params, model.params) == 0.0


def test_sharded_checkpoint(tiny_llava, tmp_path):
    model, _ = tiny_llava
    d = _copy(model.path, tmp_path / "sharded")
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(d, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    other = vicrop_jax.load_model(d, processor=False)
    assert _max_diff(other.params, model.params) == 0.0


def test_weights_fingerprint(tiny_llava, tmp_path, monkeypatch):
    """Same weights (a copy, other mtimes) -> same fingerprint; any changed byte or a
    renamed shard -> another; large files by samples, which see a change in one."""
    from convert import checkpoint

    model, _ = tiny_llava
    fp = checkpoint.weights_fingerprint(model.path)
    d = _copy(model.path, tmp_path / "copy")
    weights = os.path.join(d, "model.safetensors")
    os.utime(weights, ns=(1, 1))
    assert checkpoint.weights_fingerprint(d) == fp
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    changed = checkpoint.weights_fingerprint(d)
    assert changed != fp
    os.rename(weights, os.path.join(d, "other.safetensors"))
    assert checkpoint.weights_fingerprint(d) not in (fp, changed)
    # Sampled: 32 windows of 64 bytes over a file "larger" than the whole-hash limit.
    monkeypatch.setattr(checkpoint, "_WHOLE_HASH_BYTES", 0)
    monkeypatch.setattr(checkpoint, "_SAMPLE_BYTES", 64)
    weights = os.path.join(d, "other.safetensors")
    sampled = checkpoint.weights_fingerprint(d)
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.seek(5 * (size - 64) // 31)  # inside the sixth sample
        f.write(b"\xff\x00\xff")
    assert checkpoint.weights_fingerprint(d) != sampled
    os.remove(weights)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        checkpoint.weights_fingerprint(d)


def test_export_roundtrip_loads_in_hf(tiny_llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, hf = tiny_llava
    out = str(tmp_path / "export")
    from convert.checkpoint import save_safetensors

    save_safetensors(llava_convert.export_params(model.params), out, model.hf_config)
    again = LlavaForConditionalGeneration.from_pretrained(out).eval()
    for (name, p), (name2, q) in zip(
        hf.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert name == name2
        assert torch.equal(p, q), name
    assert _max_diff(vicrop_jax.load_model(out, processor=False).params, model.params) == 0.0


def test_tied_head_saved_anyway_must_equal_the_embedding(tmp_path):
    """A tied model's tree has no lm_head: a saved one loads when it equals the embedding and
    is reported when it differs; params come back in the expected tree's dtype."""
    from convert.checkpoint import save_safetensors
    from vicrop_jax.models.llava import init_params
    from vicrop_jax.testing import hf_config_dict

    hf = hf_config_dict(tie_word_embeddings=True)
    cfg = LlavaConfig.from_dict(hf)
    params = init_params(cfg, seed=3)
    assert "lm_head" not in params
    tensors = llava_convert.export_params(params)
    embed = tensors["language_model.model.embed_tokens.weight"]
    d = str(tmp_path / "tied")
    save_safetensors({**tensors, "language_model.lm_head.weight": embed}, d, hf)
    loaded = llava_convert.load_params(d, abstract_params(cfg, jnp.bfloat16))
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
    assert _max_diff(loaded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)) == 0.0
    save_safetensors({**tensors, "language_model.lm_head.weight": embed + 1}, d, hf)
    with pytest.raises(CheckpointError) as e:
        llava_convert.load_params(d, abstract_params(cfg))
    assert (
        "1 checkpoint keys not used: language_model.lm_head.weight "
        "(differs from the tied language_model/embed_tokens/embedding)"
    ) in str(e.value)


def test_orbax_roundtrip(tiny_llava, tmp_path):
    model, _ = tiny_llava
    path = save_params(str(tmp_path / "orbax"), model.params)
    restored = restore_params(path, like=model.params)
    assert _max_diff(restored, model.params) == 0.0
    bf16 = restore_params(path, like=jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params))
    assert jax.tree.leaves(bf16)[0].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kw",
    [
        {"vision_feature_layer": [-3, -1]},
        {"vision_feature_select_strategy": "full"},
        {"tie_word_embeddings": True},
    ],
)
def test_config_variants_match_hf(tmp_path, kw):
    from transformers import AutoProcessor

    d = str(tmp_path / "variant")
    hf = make_tiny_llava(d, seed=1, **kw)
    hf.set_attn_implementation("eager")
    model = vicrop_jax.load_model(d)
    proc = AutoProcessor.from_pretrained(d)
    rng = np.random.RandomState(1)
    from PIL import Image

    img = Image.fromarray((rng.rand(40, 40, 3) * 255).astype(np.uint8))
    inp = proc(images=img, text="<image>\nUSER: What color is it? ASSISTANT:", return_tensors="np")
    out = vicrop_jax.forward(model, inp["input_ids"], inp["pixel_values"])
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(inp["input_ids"]), pixel_values=torch.tensor(inp["pixel_values"])
        )
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() <= 1e-4


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b"])
def test_presets_param_count_matches_hf(name):
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    cfg = PRESETS[name]
    shapes = abstract_params(cfg, jnp.bfloat16)
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    t = cfg.text_config
    hf_cfg = HFLlavaConfig(
        text_config={"model_type": "llama", "vocab_size": t.vocab_size,
                     "hidden_size": t.hidden_size,
                     "intermediate_size": t.intermediate_size,
                     "num_hidden_layers": t.num_hidden_layers,
                     "num_attention_heads": t.num_attention_heads},
        image_token_index=32000,
    )  # fmt: skip
    with torch.device("meta"):
        ref = LlavaForConditionalGeneration(hf_cfg)
    theirs = sum(p.numel() for p in ref.parameters())
    assert ours == theirs, (ours, theirs)
    assert {"7b": 7_063_427_072, "13b": 13_351_494_656}[name.split("-")[-1]] == ours


def test_rope_variants_match_hf():
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ]:  # fmt: skip
        d = {"hidden_size": 256, "num_attention_heads": 2, "rope_parameters": rope}
        hf = HFLlamaConfig(**d)
        fn = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
        if rope["rope_type"] == "default":
            ref = 1.0 / (rope["rope_theta"] ** (np.arange(0, 128, 2) / 128))
        else:
            ref = fn(hf, "cpu")[0].numpy()
        ours = np.asarray(rope_inv_freq(LlamaConfig.from_dict(d)))
        np.testing.assert_allclose(ours, ref, rtol=1e-5, err_msg=rope["rope_type"])


# ---------------------------------------------------------------- bad inputs


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        vicrop_jax.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        vicrop_jax.load_model(tmp_path / "empty")


def test_missing_weights_and_bin_only(tiny_llava, tmp_path):
    model, _ = tiny_llava
    d = _copy(model.path, tmp_path / "noweights")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        vicrop_jax.load_model(d)
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a pickle; must never be opened")
    with pytest.raises(
        CheckpointError, match="pickled weights.*pytorch_model.bin.*safe_serialization"
    ):
        vicrop_jax.load_model(d)


def test_wrong_model_type(tiny_llava, tmp_path):
    model, _ = tiny_llava
    d = _copy(model.path, tmp_path / "wrongtype")
    cfg = dict(model.hf_config, model_type="bert")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        vicrop_jax.load_model(d)
    with pytest.raises(ValueError, match="model_type 'llava'"):
        LlavaConfig.from_dict({"model_type": "bert"})


def test_missing_extra_misshaped_keys_listed_together(tiny_llava, tmp_path):
    model, _ = tiny_llava
    d = _copy(model.path, tmp_path / "badkeys")

    def damage(t):
        t = dict(t)
        del t["multi_modal_projector.linear_2.bias"]
        t["vision_tower.extra_head.weight"] = np.zeros((3, 3), np.float32)
        w = t["language_model.model.layers.2.mlp.up_proj.weight"]
        t["language_model.model.layers.2.mlp.up_proj.weight"] = w[:, :-1].copy()
        return t

    _rewrite(d, damage)
    with pytest.raises(CheckpointError) as e:
        vicrop_jax.load_model(d)
    msg = str(e.value)
    assert "1 checkpoint keys not used: vision_tower.extra_head.weight" in msg
    assert "1 params not in the checkpoint: multi_modal_projector/linear_2/bias" in msg
    assert "1 shape mismatches: language_model.model.layers.2.mlp.up_proj.weight" in msg


def test_image_token_count_and_empty_prompt(tiny_llava):
    model, _ = tiny_llava
    cfg = model.config
    t = cfg.num_image_tokens
    ids = np.array([[1] + [cfg.image_token_index] * t + [5, 6]])
    pix = np.zeros((1, 3, 35, 35), np.float32)
    with pytest.raises(ValueError, match=f"{t} image tokens but 2 images"):
        vicrop_jax.forward(model, ids, np.concatenate([pix, pix]))
    with pytest.raises(ValueError, match=f"{t} image tokens but 0 images"):
        vicrop_jax.forward(model, ids)
    with pytest.raises(ValueError, match="input_ids is empty"):
        vicrop_jax.forward(model, np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match="NCHW"):
        vicrop_jax.forward(model, ids, np.zeros((1, 35, 35, 3), np.float32))


def test_preset_checkpoint_config_has_the_preset_shapes():
    # bench.pipeline --preset writes this config: HF builds the same-sized model from it (meta
    # device), our loader reads it back as the preset, and fewer layers keep the widths.
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    from vicrop_jax.models.llava import LlavaConfig
    from vicrop_jax.testing import preset_config_dict

    d = preset_config_dict("llava-1.5-7b", image_token_index=4)
    with torch.device("meta"):
        ref = LlavaForConditionalGeneration(HFLlavaConfig(**d))
    assert sum(p.numel() for p in ref.parameters()) == 7_063_427_072
    ours = LlavaConfig.from_dict(d)
    shapes = abstract_params(ours, jnp.bfloat16)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == 7_063_427_072
    assert ours.num_image_tokens == 576 and ours.vision_config.image_size == 336
    small = LlavaConfig.from_dict(preset_config_dict("llava-1.5-7b", 4, vision_layers=2,
                                                     text_layers=1))  # fmt: skip
    assert small.text_config.num_hidden_layers == 1 and small.vision_config.num_hidden_layers == 2
    assert small.text_config.hidden_size == 4096
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config_dict("llava-9b", 4)
