"""The demo model's HF config and files; every use of the converter goes through here.

The export (config.json, model.safetensors, tokenizer and processor files) has the layout of
llava-1.5-7b-hf, so `vicrop_jax.load_model` reads it through the same converter.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from convert.checkpoint import read_config, save_safetensors
from convert.llava import export_params
from eval.train_demo.config import ModelDims
from eval.train_demo.data import IMAGE_TOKEN
from vicrop_jax.loading import load_params
from vicrop_jax.models.llava import LlavaConfig, abstract_params


def hf_config(dims: ModelDims, tokenizer) -> dict:
    """The HF LlavaConfig dict of the demo model (the layout of llava-1.5-7b-hf's config)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": ids(IMAGE_TOKEN),
        "image_seq_length": dims.grid**2,
        "projector_hidden_act": "gelu",
        # The last ViT layer: a 4-layer tower would otherwise compute a layer it never uses.
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": dims.vision_hidden,
            "intermediate_size": dims.vision_mlp, "num_hidden_layers": dims.vision_layers,
            "num_attention_heads": dims.vision_heads, "image_size": dims.image_size,
            "patch_size": dims.patch_size, "projection_dim": dims.vision_hidden,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "model_type": "llama", "vocab_size": len(tokenizer),
            "hidden_size": dims.text_hidden, "intermediate_size": dims.text_mlp,
            "num_hidden_layers": dims.text_layers, "num_attention_heads": dims.text_heads,
            "num_key_value_heads": dims.text_kv_heads, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    }  # fmt: skip


def param_shapes(config: LlavaConfig) -> dict:
    """The model params' shapes and dtypes (float32), without computing them."""
    return abstract_params(config, jnp.float32)


def export(params, hf_cfg: dict, processor, out_dir: str) -> str:
    """Writes config.json, model.safetensors (float32) and the tokenizer/processor files."""
    save_safetensors(export_params(params), out_dir, hf_cfg)
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)  # safetensors writes 0600
    processor.save_pretrained(out_dir)
    return out_dir


_CONFIG_DIMS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "image_size", "patch_size"),
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads"),
}  # fmt: skip


def _config_dims(cfg: dict) -> dict:
    """The model-shape fields of a (dataclasses.asdict) LlavaConfig (what an export must
    share with the run)."""
    return {f"{part}.{k}": cfg.get(part, {}).get(k) for part, keys in _CONFIG_DIMS.items()
            for k in keys}  # fmt: skip


def load_export(src: str, config: LlavaConfig) -> dict:
    """The params of an exported model (config.json + model.safetensors, e.g.
    vicrop_jax/assets/demo), read through the same converter as llava-1.5-7b-hf; refuses an
    export of other dims than `config`'s."""
    have = _config_dims(dataclasses.asdict(LlavaConfig.from_dict(read_config(src))))
    want = _config_dims(dataclasses.asdict(config))
    if have != want:
        diff = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
        raise ValueError(f"--init_from={src} holds a model of other dims (its, ours): {diff}")
    return load_params(src, config, jnp.float32)
