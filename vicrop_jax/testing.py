"""Random HF checkpoints and offline tokenizers for tests and benchmarks, as numpy.testing
serves numpy's users: the library's own modules never import it (tests/test_layering.py).

Each checkpoint directory holds what a real one has: config.json, model.safetensors, a
tokenizer (WordLevel, from the tokenizers library) and an HF processor. The tiny configs have
small distinct dimensions so that a wrong transpose fails loudly; `make_preset_checkpoint`
writes random weights in a full-size preset's shapes. The demo trainer builds the shipped
model's tokenizer with `build_tokenizer`.
"""

from __future__ import annotations

import json
import os

import numpy as np

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
    from convert.llava import export_params
    from vicrop_jax.models.llava import LlavaConfig, init_params

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    build_processor(out_dir, tokenizer)
    hf = hf_config_dict(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    params = init_params(LlavaConfig.from_dict(hf), seed=seed, dtype=jnp.float32)
    save_safetensors(export_params(params), out_dir, hf)
    return out_dir


def preset_config_dict(name: str, image_token_index: int, *, vision_layers: int | None = None,
                       text_layers: int | None = None) -> dict:  # fmt: skip
    """The HF LlavaConfig dict of a full-size preset (vicrop_jax.models.llava.PRESETS, e.g.
    "llava-1.5-7b"), optionally with fewer layers (same widths) for a quick look on a CPU."""
    import dataclasses

    from vicrop_jax.models.llava import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]
    v, t = dataclasses.asdict(cfg.vision_config), dataclasses.asdict(cfg.text_config)
    v = {"model_type": "clip_vision_model", "projection_dim": 768, **v}
    if vision_layers:
        v["num_hidden_layers"] = vision_layers
    rope = {"rope_type": t.pop("rope_type"), "rope_theta": t.pop("rope_theta")}
    for k in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
              "rope_original_max_position_embeddings"):  # fmt: skip
        t.pop(k)
    t.update(model_type="llama", rope_parameters=rope, eos_token_id=2, bos_token_id=1)
    if text_layers:
        t["num_hidden_layers"] = text_layers
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": image_token_index, "image_seq_length": cfg.num_image_tokens,
        "projector_hidden_act": cfg.projector_hidden_act,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings, "vision_config": v, "text_config": t,
    }  # fmt: skip


def make_preset_checkpoint(out_dir: str, name: str = "llava-1.5-7b", *, dtype: str = "bfloat16",
                           seed: int = 0, vision_layers: int | None = None,
                           text_layers: int | None = None) -> str:  # fmt: skip
    """A random-weight checkpoint with a full-size preset's shapes (for benchmarks: timings do
    not depend on the weights), the tiny WordLevel tokenizer and a CLIP processor at the
    preset's resolution, written with vicrop_jax's own exporter."""
    import jax.numpy as jnp
    from transformers import CLIPImageProcessor, LlavaProcessor

    from convert.checkpoint import save_safetensors
    from convert.llava import export_params
    from vicrop_jax.models.llava import LlavaConfig, init_params

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    hf = preset_config_dict(name, tokenizer.convert_tokens_to_ids("<image>"),
                            vision_layers=vision_layers, text_layers=text_layers)  # fmt: skip
    hf["torch_dtype"] = dtype
    vc = hf["vision_config"]
    side = vc["image_size"]
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                           crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=vc["patch_size"],
        vision_feature_select_strategy=hf["vision_feature_select_strategy"],
        num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip
    proc.save_pretrained(out_dir)
    params = init_params(LlavaConfig.from_dict(hf), seed=seed, dtype=jnp.dtype(dtype))
    save_safetensors(export_params(params), out_dir, hf)
    return out_dir


# --- InstructBLIP (Vicuna) -------------------------------------------------------------------

BLIP_WORDS = ("Question:", "Short", "answer:")
BLIP_QUERY_TOKENS = 7


def instructblip_config_dict(
    vocab_size: int = 131,
    image_token_index: int = 4,
    qformer_vocab_size: int = 67,
    num_query_tokens: int = BLIP_QUERY_TOKENS,
    text_layers: int = 5,
    qformer_layers: int = 5,
    tie_word_embeddings: bool = False,
) -> dict:
    """An HF InstructBlipConfig dict (Llama text) with tiny, distinct dimensions."""
    return {
        "model_type": "instructblip",
        "architectures": ["InstructBlipForConditionalGeneration"],
        "num_query_tokens": num_query_tokens,
        "image_token_index": image_token_index,
        "tie_word_embeddings": tie_word_embeddings,
        "vision_config": {
            "model_type": "instructblip_vision_model", "hidden_size": 22, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE,
            "patch_size": PATCH, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
        },
        "qformer_config": {
            "model_type": "instructblip_qformer", "vocab_size": qformer_vocab_size,
            "hidden_size": 30, "num_hidden_layers": qformer_layers, "num_attention_heads": 3,
            "intermediate_size": 41, "hidden_act": "gelu", "max_position_embeddings": 64,
            "layer_norm_eps": 1e-12, "pad_token_id": 0, "cross_attention_frequency": 2,
            "encoder_hidden_size": 22,
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


def build_qformer_tokenizer(out_dir: str):
    """A BERT-style WordLevel tokenizer ([CLS] text [SEP], right padding) for the Q-Former."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in (*WORDS, *BLIP_WORDS):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", padding_side="right",
    )  # fmt: skip
    return fast


def build_instructblip_processor(out_dir: str, tokenizer, qformer_tokenizer):
    """An HF InstructBlipProcessor (BLIP image processor at IMAGE px) saved to out_dir."""
    from transformers import BlipImageProcessor, InstructBlipProcessor

    image_processor = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    proc = InstructBlipProcessor(
        image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=BLIP_QUERY_TOKENS,
    )  # fmt: skip
    proc.save_pretrained(out_dir)
    return proc


def build_instructblip_tokenizers(out_dir: str):
    """(LM tokenizer with `<image>`, Q-Former tokenizer) for the tiny InstructBLIP."""
    return build_tokenizer(out_dir, BLIP_WORDS), build_qformer_tokenizer(out_dir)


def make_random_instructblip_checkpoint(out_dir: str, seed: int = 0) -> str:
    """A complete tiny random InstructBLIP checkpoint written with vicrop_jax's exporter."""
    import jax.numpy as jnp

    from convert.checkpoint import save_safetensors
    from convert.instructblip import export_params
    from vicrop_jax.models.instructblip import InstructBlipConfig, init_params

    os.makedirs(out_dir, exist_ok=True)
    tokenizer, qformer_tokenizer = build_instructblip_tokenizers(out_dir)
    build_instructblip_processor(out_dir, tokenizer, qformer_tokenizer)
    hf = instructblip_config_dict(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    params = init_params(InstructBlipConfig.from_dict(hf), seed=seed, dtype=jnp.float32)
    save_safetensors(export_params(params), out_dir, hf)
    return out_dir


# --- The official map recipe on an HF torch model (test and benchmark references) -------------


def official_image_attention(hf, proc, text, image, layers) -> np.ndarray:
    """The last query's attention over every image token of `text` (one image), heads
    averaged, then averaged over `layers`: float[K], tokens in prompt order."""
    import torch

    enc = proc(images=image, text=text, return_tensors="pt")
    keep = enc["input_ids"][0] == proc.tokenizer.convert_tokens_to_ids("<image>")
    with torch.no_grad():
        att = hf(**enc, output_attentions=True).attentions
    return np.mean([att[i][0, :, -1][:, keep].mean(0).float().numpy() for i in layers], 0)


def official_rel_att(hf, proc, prompt, image, question, layers) -> np.ndarray:
    """The official rel-att per image token: the question's attention over the general
    prompt's, separate passes (prompt: question -> text). float[K]."""
    from vicrop_jax.processing import GENERAL_QUESTION

    q = official_image_attention(hf, proc, prompt(question), image, layers)
    return q / official_image_attention(hf, proc, prompt(GENERAL_QUESTION), image, layers)


def _neg_ce_of_argmax(logits):
    import torch

    z = logits[:, -1, :]
    return -torch.nn.functional.cross_entropy(z, z.argmax(1))


def official_grad_att(hf, proc, prompt, image, question, layers) -> np.ndarray:
    """The official grad-att per image token: A * relu(dL/dA) of the last query, heads
    averaged, averaged over `layers`; L = -CE(last logits, their argmax). float[K]."""
    import torch

    enc = proc(images=image, text=prompt(question), return_tensors="pt")
    keep = enc["input_ids"][0] == proc.tokenizer.convert_tokens_to_ids("<image>")
    enc["pixel_values"].requires_grad_(True)  # a path for autograd when params are frozen
    out = hf(**enc, output_attentions=True)
    atts = [out.attentions[i] for i in layers]
    grads = torch.autograd.grad(_neg_ce_of_argmax(out.logits), atts)
    per = [
        (a * torch.relu(g))[0, :, -1][:, keep].mean(0).detach().float().numpy()
        for a, g in zip(atts, grads, strict=True)
    ]
    return np.mean(per, 0)


def official_pixel_grad_norms(hf, proc, prompt, image, question) -> np.ndarray:
    """pure-grad's ratio before the mask: the channel L2 norm of dL/d(pixel_values) for the
    question over the same for the general prompt, in pixel_values' layout without its
    batch and channel axes ([H, W], or [tiles, H, W] for anyres processors)."""
    import torch

    from vicrop_jax.processing import GENERAL_QUESTION

    norms = []
    for q in (question, GENERAL_QUESTION):
        enc = proc(images=image, text=prompt(q), return_tensors="pt")
        enc["pixel_values"].requires_grad_(True)
        (g,) = torch.autograd.grad(_neg_ce_of_argmax(hf(**enc).logits), enc["pixel_values"])
        norms.append(np.linalg.norm(g[0].float().numpy(), axis=-3))
    return norms[0] / norms[1]


def patch_mean(x, patch: int) -> np.ndarray:
    """float[H, W] -> the mean over each patch x patch cell, float[H / patch, W / patch]."""
    h, w = x.shape
    return x.reshape(h // patch, patch, w // patch, patch).mean((1, 3))


def official_blip_run(hf, proc, text, image, pixels=None):
    """One HF InstructBLIP pass (the processor's inputs for `text` and one image; `pixels`, a
    tensor, in place of its pixel_values) recording every attention: (outputs, the LM's
    attentions, the Q-Former's cross-attentions, the image-token positions int[T])."""
    enc = proc(images=image, text=text, return_tensors="pt")
    out, cross = blip_hf_forward(hf, enc, enc["pixel_values"] if pixels is None else pixels)
    pos = (enc["input_ids"][0] == hf.config.image_token_index).nonzero()[:, 0]
    return out, out.language_model_outputs.attentions, cross, pos


def blip_hf_forward(hf, enc, pixels):
    """HF InstructBLIP's vision -> Q-Former -> LM in one autograd graph with every attention
    recorded (its forward does not return the Q-Former's): (outputs, cross-attentions).
    enc: the processor's torch tensors; pixels: float[I, C, H, W]."""
    feats = hf.get_image_features(
        pixels, qformer_input_ids=enc["qformer_input_ids"],
        qformer_attention_mask=enc["qformer_attention_mask"], output_attentions=True,
    )  # fmt: skip
    out = hf(
        pixel_values=None, qformer_input_ids=None, input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"], mm_encoder_outputs={"image": feats},
        output_attentions=True,
    )  # fmt: skip
    return out, feats.qformer_outputs.cross_attentions


def _blip_a_si(st, cross) -> np.ndarray:
    """A_st float[T] @ A_ti (cross-attention [1, heads, T, P]: heads averaged, class token
    dropped) -> float[P - 1]."""
    return st @ cross[0, :, :, 1:].mean(0).detach().float().numpy()


def official_blip_rel_att(hf, proc, prompt, image, question, layers, qformer_layer) -> np.ndarray:
    """The paper's InstructBLIP rel-att (A_si = A_st @ A_ti, the question's over the general
    prompt's, separate passes) per ViT patch, float[P - 1]; A_st averaged over `layers`,
    A_ti from cross-attention layer `qformer_layer`. prompt: question -> text."""
    import torch

    from vicrop_jax.processing import GENERAL_QUESTION

    maps = []
    for q in (question, GENERAL_QUESTION):
        with torch.no_grad():
            _, atts, cross, pos = official_blip_run(hf, proc, prompt(q), image)
        st = np.mean([atts[i][0, :, -1, pos].mean(0).float().numpy() for i in layers], 0)
        maps.append(_blip_a_si(st, cross[qformer_layer]))
    return maps[0] / maps[1]


def official_blip_grad_att(hf, proc, prompt, image, question, layers, qformer_layer) -> np.ndarray:
    """The paper's InstructBLIP grad-att: A_st and A_ti each weighted by relu(dL/dA) before
    the product (L = -CE(last logits, their argmax)), float[P - 1]."""
    import torch

    pix = proc.image_processor(image, return_tensors="pt")["pixel_values"].requires_grad_(True)
    out, atts, cross, pos = official_blip_run(hf, proc, prompt(question), image, pix)
    lm = [atts[i] for i in layers]
    grads = torch.autograd.grad(_neg_ce_of_argmax(out.logits), [*lm, cross[qformer_layer]])
    st = np.mean([(a * torch.relu(g))[0, :, -1, pos].mean(0).detach().float().numpy()
                  for a, g in zip(lm, grads[:-1], strict=True)], 0)  # fmt: skip
    return _blip_a_si(st, cross[qformer_layer] * torch.relu(grads[-1]))


def official_blip_pixel_grad_norms(hf, proc, prompt, image, question) -> np.ndarray:
    """`official_pixel_grad_norms` for InstructBLIP (the Q-Former reads each prompt too):
    float[H, W]."""
    import torch

    from vicrop_jax.processing import GENERAL_QUESTION

    norms = []
    for q in (question, GENERAL_QUESTION):
        pix = proc.image_processor(image, return_tensors="pt")["pixel_values"]
        pix.requires_grad_(True)
        out, _, _, _ = official_blip_run(hf, proc, prompt(q), image, pix)
        (g,) = torch.autograd.grad(_neg_ce_of_argmax(out.logits), [pix])
        norms.append(np.linalg.norm(g[0].float().numpy(), axis=0))
    return norms[0] / norms[1]


# --- Qwen2.5-VL (image-only processor files) -------------------------------------------------

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
# Byte-level tokens (one per byte, no merges) then the special tokens: every id is below this.
QWEN_VOCAB = 256 + len(QWEN_SPECIAL_TOKENS)

# A Qwen2-VL-style chat template: the default system message, one user turn whose images come
# as <|vision_start|><|image_pad|><|vision_end|> (videos with <|video_pad|>), and the
# assistant's generation prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_5_vl_processor_files(
    out_dir: str, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
    template_in: str = "chat_template.json",
):  # fmt: skip
    """A Qwen2.5-VL checkpoint's tokenizer and processor files in out_dir (the hub's layout):
    a byte-level BPE tokenizer with Qwen's special tokens (ids below QWEN_VOCAB; pad
    <|endoftext|>, eos <|im_end|>), QWEN_CHAT_TEMPLATE, and the Qwen2-VL image processor's
    preprocessor_config.json (patch 14, merge 2, temporal patch 2). template_in: where the
    template goes, "chat_template.json" or "tokenizer" (its own files). Returns the
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AddedToken, PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    os.makedirs(out_dir, exist_ok=True)
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL_TOKENS
    ]})  # fmt: skip
    if template_in == "tokenizer":
        fast.chat_template = QWEN_CHAT_TEMPLATE
    elif template_in == "chat_template.json":
        with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
            json.dump({"chat_template": QWEN_CHAT_TEMPLATE}, f)
    else:
        raise ValueError(f"template_in must be 'chat_template.json' or 'tokenizer', got "
                         f"{template_in!r}")  # fmt: skip
    fast.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out_dir)
    return fast
