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
