"""Tiny random HF torch checkpoints for parity tests (model + tokenizer + processor)."""

from __future__ import annotations

import os

from vicrop_jax.testing import build_processor, build_tokenizer, hf_config_dict


def make_tiny_llava(out_dir: str, seed: int = 0, with_processor: bool = True, **config_kw):
    """Saves a tiny random HF LlavaForConditionalGeneration (+ processor); returns the model."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir) if with_processor else None
    image_token = tokenizer.convert_tokens_to_ids("<image>") if tokenizer else 4
    cfg = LlavaConfig(**hf_config_dict(image_token_index=image_token, **config_kw))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Fresh init leaves norms at exactly 1 and biases at 0; perturb every tensor so parity
    # tests exercise each parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out_dir)
    if with_processor:
        build_processor(
            out_dir, tokenizer, config_kw.get("vision_feature_select_strategy", "default")
        )
    return model


def make_tiny_instructblip(out_dir: str, seed: int = 0, with_processor: bool = True, **config_kw):
    """Saves a tiny random HF InstructBlipForConditionalGeneration (+ processor); returns it."""
    import torch
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from vicrop_jax.testing import (
        build_instructblip_processor,
        build_instructblip_tokenizers,
        instructblip_config_dict,
    )

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = qformer_tokenizer = None
    if with_processor:
        tokenizer, qformer_tokenizer = build_instructblip_tokenizers(out_dir)
    image_token = tokenizer.convert_tokens_to_ids("<image>") if tokenizer else 4
    cfg = InstructBlipConfig(**instructblip_config_dict(image_token_index=image_token, **config_kw))
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(cfg).eval()
    # Perturb every tensor (fresh init has zero query tokens, unit norms); 0.2 rather than
    # LLaVA's 0.05 so attention is far from uniform and greedy tokens vary (stronger tests).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out_dir)
    if with_processor:
        build_instructblip_processor(out_dir, tokenizer, qformer_tokenizer)
    return model


# Token ids of the tiny Qwen2.5-VL vocabulary (131 ids, no tokenizer: tests build input_ids).
QWEN_IDS = {"image": 127, "video": 128, "vision_start": 125, "vision_end": 126}


def qwen2_5_vl_config_dict(tie_word_embeddings: bool = False) -> dict:
    """A transformers-5 Qwen2_5_VLConfig dict with tiny, distinct dimensions: 4 px patches,
    16 px windows (2 x 2 merged tokens), window attention at block 0 and full attention at
    block 1, head size 10 with mrope_section [1, 2, 2]."""
    return {
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "image_token_id": QWEN_IDS["image"], "video_token_id": QWEN_IDS["video"],
        "vision_start_token_id": QWEN_IDS["vision_start"],
        "vision_end_token_id": QWEN_IDS["vision_end"],
        "tie_word_embeddings": tie_word_embeddings,
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 24,
            "intermediate_size": 37, "num_heads": 2, "in_channels": 3, "patch_size": 4,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16,
            "out_hidden_size": 40, "fullatt_block_indexes": [1], "hidden_act": "silu",
        },
        "text_config": {
            "model_type": "qwen2_5_vl_text", "vocab_size": 131, "hidden_size": 40,
            "intermediate_size": 53, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [1, 2, 2]},
        },
    }  # fmt: skip


def make_tiny_qwen2_5_vl(out_dir: str, seed: int = 0, tie_word_embeddings: bool = False,
                         config: dict | None = None):  # fmt: skip
    """Saves a tiny random HF Qwen2_5_VLForConditionalGeneration (no processor; config: a
    config dict other than `qwen2_5_vl_config_dict`'s); returns it with eager attention."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    cfg = Qwen2_5_VLConfig(**(config or qwen2_5_vl_config_dict(tie_word_embeddings)))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # Perturb every tensor (fresh init leaves norms at 1, biases at 0); 0.15 so that greedy
    # tokens vary.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    model.save_pretrained(out_dir)
    model.set_attn_implementation("eager")
    return model


def make_tiny_qwen2_5_vl_checkpoint(out_dir: str, seed: int = 6,
                                    repetition_penalty: float = 1.05):  # fmt: skip
    """A tiny Qwen2.5-VL checkpoint directory with its processor files (14 px patches, 112 px
    windows; vicrop_jax.testing's tokenizer and chat template) and a generation_config.json
    with the Instruct checkpoints' stop ids and a repetition penalty; returns the HF model."""
    import json

    from vicrop_jax.testing import QWEN_VOCAB, build_qwen2_5_vl_processor_files

    tok = build_qwen2_5_vl_processor_files(out_dir)
    names = ("image_pad", "video_pad", "vision_start", "vision_end", "im_end", "endoftext")
    ids = {k: tok.convert_tokens_to_ids(f"<|{k}|>") for k in names}
    config = qwen2_5_vl_config_dict()
    config.update(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                  vision_start_token_id=ids["vision_start"],
                  vision_end_token_id=ids["vision_end"])  # fmt: skip
    config["vision_config"].update(patch_size=14, window_size=112)
    config["text_config"].update(vocab_size=QWEN_VOCAB, eos_token_id=tok.eos_token_id,
                                 bos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
    hf = make_tiny_qwen2_5_vl(out_dir, seed=seed, config=config)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [ids["im_end"], ids["endoftext"]],
                   "pad_token_id": ids["endoftext"], "do_sample": False,
                   "repetition_penalty": repetition_penalty}, f)  # fmt: skip
    return hf


# Pinpoints (height, width) in tiles of the tiny tower's 35 px: a wide, a tall and a square
# grid, so that test images select each.
NEXT_PINPOINTS = [[35, 70], [70, 35], [70, 70]]


def make_tiny_llava_next(out_dir: str, seed: int = 0, text_config: dict | None = None,
                         **config_kw):  # fmt: skip
    """Saves a tiny random HF LlavaNextForConditionalGeneration + processor; returns it.
    text_config: fields replacing the tiny Llama text config's (a Mistral one, say)."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from vicrop_jax.testing import IMAGE, PATCH

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    d = hf_config_dict(image_token_index=image_token, **config_kw)
    d.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
             image_grid_pinpoints=NEXT_PINPOINTS)  # fmt: skip
    d.pop("image_seq_length")
    d["text_config"].update(text_config or {})
    cfg = LlavaNextConfig(**d)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out_dir)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )  # fmt: skip
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    ).save_pretrained(out_dir)  # fmt: skip
    return model
