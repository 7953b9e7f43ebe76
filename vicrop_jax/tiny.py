"""A tiny LLaVA checkpoint (random weights) built offline: the smoke model and the test base.

Everything a real checkpoint directory has: config.json, model.safetensors, a tokenizer
(WordLevel, from the tokenizers library) and an HF LlavaProcessor. Dimensions are small
distinct numbers so that a wrong transpose fails loudly.
"""

from __future__ import annotations

import os

WORDS = (
    "USER: ASSISTANT: Answer the question using a single word or phrase. Write general "
    "description of image. What is written on red green blue circle? square? triangle? "
    "color shape text yes no left right top bottom how many are there in this picture"
).split()

PATCH, IMAGE, GRID = 7, 35, 5


def hf_config_dict(
    vocab_size: int = 131,
    image_token_index: int = 4,
    vision_feature_layer=-2,
    vision_feature_select_strategy: str = "default",
    tie_word_embeddings: bool = False,
    text_layers: int = 5,
) -> dict:
    """An HF LlavaConfig dict with tiny, distinct dimensions."""
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": image_token_index,
        "image_seq_length": GRID * GRID + (vision_feature_select_strategy == "full"),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": vision_feature_layer,
        "vision_feature_select_strategy": vision_feature_select_strategy,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": tie_word_embeddings,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 28, "intermediate_size": 37,
            "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": IMAGE,
            "patch_size": PATCH, "projection_dim": 11, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 40,
            "intermediate_size": 53, "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
            "tie_word_embeddings": tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    }  # fmt: skip


def build_tokenizer(out_dir: str, extra_words=()):
    """A WordLevel tokenizer wrapped in PreTrainedTokenizerFast, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in (*WORDS, *extra_words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", padding_side="left",
    )  # fmt: skip
    fast.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<image>", normalized=False)]}
    )
    fast.add_bos_token = True
    fast.save_pretrained(out_dir)
    return fast


def build_processor(out_dir: str, tokenizer, strategy: str = "default"):
    """An HF LlavaProcessor (CLIP image processor at IMAGE px) saved to out_dir."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    proc = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
        image_token="<image>",
    )  # fmt: skip
    proc.save_pretrained(out_dir)
    return proc


def make_random_checkpoint(out_dir: str, seed: int = 0) -> str:
    """A complete tiny random checkpoint written with vicrop_jax's own exporter (no torch)."""
    import jax.numpy as jnp

    from convert.checkpoint import save_safetensors
    from convert.llava import export_params, init_params
    from vicrop_jax.models.llava import LlavaConfig

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    build_processor(out_dir, tokenizer)
    hf = hf_config_dict(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    params = init_params(LlavaConfig.from_dict(hf), seed=seed, dtype=jnp.float32)
    save_safetensors(export_params(params), out_dir, hf)
    return out_dir
