"""Random LLaVA-1.5-7B and InstructBLIP-Vicuna-7B checkpoints in the hubs' own layouts,
written one tensor at a time.

  python -m bench.fullsize_checkpoint --out /tmp/llava7b --variant full    # 14 GB, bf16
  python -m bench.fullsize_checkpoint --out /tmp/llava7b_wide2 --variant wide2  # 2.9 GB, f32
  python -m bench.fullsize_checkpoint --family instructblip --out /tmp/blip7b_wide2 \\
      --variant wide2                                                      # 3.6 GB, f32

What `llava-hf/llava-1.5-7b-hf` holds, with random weights:
  * config.json: the hub's own (a partial text_config that leaves the Vicuna-7B widths to
    transformers' LlamaConfig defaults; CLIP ViT-L/14 at 336 px; vision_feature_layer -2);
    generation_config.json (BOS 1, EOS 2, pad 32001).
  * Weights: hub key names (`language_model.model.*`, `language_model.lm_head.weight`,
    `vision_tower.vision_model.*`, `multi_modal_projector.*`), sharded safetensors of at most
    5 GB each (the hub's rule: 3 shards for 7B) with `model.safetensors.index.json`.
    Matrices, embeddings and biases N(0, 0.02) (transformers' initializer_range; biases are
    drawn too, where transformers zeroes them, so checks exercise them), norm weights 1 and
    norm biases 0. Each tensor is drawn from its own seed (the run seed and the key name),
    so a tensor's values do not depend on the others or on the order of writing; the writer
    holds one tensor at a time.
  * The LlavaProcessor: the hub's CLIPImageProcessor settings (shortest edge 336, bicubic,
    centre crop 336, CLIP mean and std), patch size 14, the "default" feature strategy, the
    hub's chat template, and a WordLevel tokenizer (transformers' tokenizers, offline) of
    all 32064 ids: `<unk>` 0, `<s>` 1, `</s>` 2, the prompt's words, fillers, `<image>`
    32000, `<pad>` 32001, fillers to 32063. The hub's SentencePiece tokenizer has 32002
    entries (rows 32002-32063 of the embedding are padding); ours names every row so that
    any token a random model picks decodes.

Variants: "full" (32 LM layers, 24 CLIP layers, bfloat16: the hub's shapes) and "wide2" (every
width, head count, vocabulary, image size and token count of 7B, 2 LM and 2 CLIP layers,
float32: small enough to sit beside the HF torch model for exact parity checks). With 2 CLIP
layers vision_feature_layer -2 selects the first layer's output, as it selects layer 23 of 24.

InstructBLIP (`--family instructblip`, `Salesforce/instructblip-vicuna-7b` with image tokens):
  * config.json: as the hub's, the vision and Q-Former configs leave their widths to
    transformers' defaults: EVA ViT-g/14 at 224 px (1408 wide, 39 layers of 16 heads, MLP
    6144, q/v biases), the BERT-base Q-Former (768 wide, 12 layers of 12 heads,
    cross-attention every 2nd layer over the 1408-wide patches) with vocabulary 30523
    (BERT's 30522 + `[DEC]`); 32 query tokens; Vicuna-7B (LLaMA 4096 wide, 32 layers of 32
    heads, MLP 11008) with vocabulary 32064 (the Vicuna tokenizer's 32000 ids, `[PAD]`
    32000, `<image>` 32001, rows padded to 32064); `image_token_index` 32001. The
    text_config keeps the hub's stale bos/eos ids (0/1); generation_config.json gives EOS 2
    (`</s>`), the id generation stops at.
  * Weights: transformers' key names (`query_tokens`, `vision_model.*` with one fused
    `self_attn.qkv` whose bias has a zero key third, as the q/v-bias EVA checkpoint gives,
    `qformer.*`, `language_projection.*`, `language_model.model.*`,
    `language_model.lm_head.weight`), in state-dict order, shards of at most 10 GB
    (transformers 4.31's default: the hub's float32 weights are 4 shards).
  * The InstructBlipProcessor: BlipImageProcessor (224 x 224, bicubic, CLIP mean and std,
    no crop), num_query_tokens 32, a WordLevel LM tokenizer of all 32064 ids (`<unk>` 0,
    `<s>` 1, `</s>` 2 = BOS = EOS as the hub's conversion sets them, `[PAD]` 32000, `<image>`
    32001) and a WordLevel Q-Former tokenizer of all 30523 ids with BERT's special ids
    (`[PAD]` 0, `[UNK]` 100, `[CLS]` 101, `[SEP]` 102, `[MASK]` 103, `[DEC]` 30522),
    lower-casing and splitting punctuation as bert-base-uncased does, `[CLS] text [SEP]`.
  Variants: "full" (bfloat16) and "wide2" (2 LM and 2 ViT layers, the whole 12-layer Q-Former
  so that the paper's cross-attention layer (2 of 6) is the real one; float32).

A directory that holds a complete checkpoint of the same variant and seed (fullsize.json,
written last, and every shard at its recorded size) is left as it is.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import time
import zlib
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
from absl import flags

INIT_STD = 0.02
MARKER = "fullsize.json"
INDEX = "model.safetensors.index.json"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# llava-hf/llava-1.5-7b-hf's chat_template.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
VOCAB = 32064
IMAGE_ID, PAD_ID = 32000, 32001
VARIANTS = {"full": (None, None, "bfloat16"), "wide2": (2, 2, "float32")}
_ST_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}


def hub_config(text_layers: int | None = None, vision_layers: int | None = None,
               dtype: str = "bfloat16") -> dict:  # fmt: skip
    """llava-hf/llava-1.5-7b-hf's config.json (torch_dtype aside: the hub's is float16),
    optionally with fewer layers. The text_config names only what differs from
    transformers' LlamaConfig defaults, as the hub's does."""
    text = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": VOCAB,
    }  # fmt: skip
    vision = {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000,
    }  # fmt: skip
    if text_layers:
        text["num_hidden_layers"] = text_layers
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
        "image_seq_length": 576, "image_token_index": IMAGE_ID, "model_type": "llava",
        "pad_token_id": PAD_ID, "projector_hidden_act": "gelu", "text_config": text,
        "tie_word_embeddings": False, "torch_dtype": dtype,
        "transformers_version": "4.36.0.dev0", "vision_config": vision,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": VOCAB,
    }  # fmt: skip


def llama_specs(t: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, HF shape, init) of the language model (`language_model.*`) of text config t, in
    state-dict order; widths missing from t take LlamaConfig's defaults (Vicuna-7B's)."""
    d, inter = t.get("hidden_size", 4096), t.get("intermediate_size", 11008)
    heads = t.get("num_attention_heads", 32)
    kv_width = (t.get("num_key_value_heads") or heads) * t.get("head_dim", d // heads)
    lm = "language_model.model"
    out = [(f"{lm}.embed_tokens.weight", (t["vocab_size"], d), "normal")]
    for i in range(t.get("num_hidden_layers", 32)):
        pre = f"{lm}.layers.{i}"
        for name, o, n in (("self_attn.q_proj", d, d), ("self_attn.k_proj", kv_width, d),
                           ("self_attn.v_proj", kv_width, d), ("self_attn.o_proj", d, d),
                           ("mlp.gate_proj", inter, d), ("mlp.up_proj", inter, d),
                           ("mlp.down_proj", d, inter)):  # fmt: skip
            out.append((f"{pre}.{name}.weight", (o, n), "normal"))
        out.append((f"{pre}.input_layernorm.weight", (d,), "ones"))
        out.append((f"{pre}.post_attention_layernorm.weight", (d,), "ones"))
    out.append((f"{lm}.norm.weight", (d,), "ones"))
    out.append(("language_model.lm_head.weight", (t["vocab_size"], d), "normal"))
    return out


def spec_writers(out: list):
    """(linear(name, o, i, bias=True), layer_norm(name, n)): append an HF Linear's (normal
    weight [o, i] and bias [o]) or LayerNorm's (ones, zeros [n]) tensor specs to `out`."""

    def linear(name, o, i, bias=True):
        out.append((f"{name}.weight", (o, i), "normal"))
        if bias:
            out.append((f"{name}.bias", (o,), "normal"))

    def layer_norm(name, n):
        out.extend([(f"{name}.weight", (n,), "ones"), (f"{name}.bias", (n,), "zeros")])

    return linear, layer_norm


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(hub key, HF shape, init) of every tensor, in the hub's state-dict order (vision tower,
    projector, language model); init is "normal", "ones" or "zeros". Widths missing from the
    config take transformers' defaults (LlamaConfig: Vicuna-7B's). An InstructBLIP config
    gives `blip_tensor_specs`'s."""
    if family_of_config(config) == "instructblip":
        return blip_tensor_specs(config)
    t, v = config["text_config"], config["vision_config"]
    d = t.get("hidden_size", 4096)
    dv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    positions = (v["image_size"] // p) ** 2 + 1
    layers = config["vision_feature_layer"]
    n_feat = 1 if isinstance(layers, int) else len(layers)
    out: list[tuple[str, tuple[int, ...], str]] = []
    linear, layer_norm = spec_writers(out)

    vt = "vision_tower.vision_model"
    out += [
        (f"{vt}.embeddings.class_embedding", (dv,), "normal"),
        (f"{vt}.embeddings.patch_embedding.weight", (dv, v.get("num_channels", 3), p, p),
         "normal"),
        (f"{vt}.embeddings.position_embedding.weight", (positions, dv), "normal"),
    ]  # fmt: skip
    layer_norm(f"{vt}.pre_layrnorm", dv)
    for i in range(v["num_hidden_layers"]):
        pre = f"{vt}.encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linear(f"{pre}.self_attn.{name}", dv, dv)
        layer_norm(f"{pre}.layer_norm1", dv)
        linear(f"{pre}.mlp.fc1", iv, dv)
        linear(f"{pre}.mlp.fc2", dv, iv)
        layer_norm(f"{pre}.layer_norm2", dv)
    layer_norm(f"{vt}.post_layernorm", dv)
    linear("multi_modal_projector.linear_1", d, dv * n_feat)
    linear("multi_modal_projector.linear_2", d, d)
    return out + llama_specs(t)


def make_tensor(name: str, shape: tuple[int, ...], init: str, dtype: str, seed: int) -> np.ndarray:
    """One tensor's values: its own generator, seeded by (seed, crc32 of the key). init:
    "normal" (N(0, INIT_STD)), "qkv_bias" (the same with the middle third zero), "ones" or
    "zeros"."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    if init == "ones":
        return np.ones(shape, np_dtype)
    if init == "zeros":
        return np.zeros(shape, np_dtype)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= INIT_STD
    if init == "qkv_bias":
        n = shape[0] // 3
        x[n : 2 * n] = 0
    return x.astype(np_dtype, copy=False)


def plan_shards(sizes: Iterable[tuple[str, int]], limit: int) -> list[list[str]]:
    """transformers' rule: tensors in order, a new shard when the next would pass `limit`."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], str]],
                      make: Callable[[str], np.ndarray]) -> int:  # fmt: skip
    """Writes one safetensors file tensor by tensor: the header first (from the shapes), then
    each tensor as `make(name)` returns it. entries: (name, shape, safetensors dtype).
    Returns the file's size in bytes."""
    itemsize = {"BF16": 2, "F16": 2, "F32": 4}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, st in entries:
        n = int(np.prod(shape)) * itemsize[st]
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, st in entries:
            x = make(name)
            if x.shape != tuple(shape) or x.dtype.itemsize != itemsize[st]:
                raise ValueError(f"{name}: made {x.shape} {x.dtype}, header says {shape} {st}")
            np.ascontiguousarray(x).tofile(f)
    os.chmod(path, 0o644)
    return 8 + len(blob) + offset


def write_weights(out_dir: str, config: dict, dtype: str, seed: int,
                  shard_bytes: int) -> dict:  # fmt: skip
    """Writes the sharded weights and their index; returns the index."""
    specs = tensor_specs(config)
    itemsize = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    by_name = {name: (shape, init) for name, shape, init in specs}
    sizes = [(name, int(np.prod(shape)) * itemsize) for name, shape, _ in specs]
    shards = plan_shards(sizes, shard_bytes)
    weight_map, files = {}, {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, by_name[n][0], _ST_DTYPES[dtype]) for n in names]
        make = lambda n: make_tensor(n, *by_name[n], dtype, seed)  # noqa: E731
        files[file] = write_safetensors(os.path.join(out_dir, file), entries, make)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(n for _, n in sizes)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return {"files": files, "total_size": total}


def filled_wordlevel(out_dir: str, words, specials: dict[str, int], size: int, **wrap):
    """A WordLevel tokenizer of `size` ids (module docstring): <unk> <s> </s>, `words`,
    `w{n}` fillers up to the first of `specials` (token -> id, consecutive ids), then
    `<extra_k>`; wrapped in a left-padding PreTrainedTokenizerFast (`wrap`: its special
    tokens and sides) with `<image>` special, its ids checked, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    fill = iter(range(size))
    while len(vocab) < min(specials.values()):
        vocab.setdefault(f"w{next(fill)}", len(vocab))
    vocab.update(specials)
    last = max(specials.values())
    while len(vocab) < size:
        vocab[f"<extra_{len(vocab) - last - 1}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", padding_side="left", **wrap
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]}
    )
    fast.add_bos_token = True
    want = {"<unk>": 0, "<s>": 1, "</s>": 2, **specials}
    got = {t: fast.convert_tokens_to_ids(t) for t in want}
    if got != want or len(fast) != size:
        raise AssertionError(f"tokenizer ids {got}, {len(fast)} entries; want {want}, {size}")
    fast.save_pretrained(out_dir)
    return fast


def build_tokenizer(out_dir: str):
    """The WordLevel stand-in for the hub's tokenizer, all 32064 ids (module docstring)."""
    from vicrop_jax.testing import WORDS

    return filled_wordlevel(
        out_dir, WORDS, {"<image>": IMAGE_ID, "<pad>": PAD_ID}, VOCAB,
        bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )  # fmt: skip


def build_processor(out_dir: str, tokenizer, config: dict):
    """The hub's LlavaProcessor settings around `tokenizer`, saved to out_dir."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    v = config["vision_config"]
    side = v["image_size"]
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": side}, resample=3, do_center_crop=True,
        crop_size={"height": side, "width": side}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )  # fmt: skip
    proc = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=v["patch_size"],
        vision_feature_select_strategy=config["vision_feature_select_strategy"],
        num_additional_image_tokens=1, image_token="<image>", chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    proc.save_pretrained(out_dir)
    return proc


# --- InstructBLIP-Vicuna-7B ------------------------------------------------------------------

BLIP_VOCAB, QFORMER_VOCAB = 32064, 30523
BLIP_PAD_ID, BLIP_IMAGE_ID, BLIP_EOS_ID = 32000, 32001, 2
BLIP_QUERY_TOKENS = 32
QFORMER_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
# (LM layers, ViT layers, Q-Former layers, dtype); None keeps the hub's depth.
BLIP_VARIANTS = {"full": (None, None, None, "bfloat16"), "wide2": (2, 2, None, "float32")}
SHARD_BYTES = {"llava": 5 * 10**9, "instructblip": 10 * 10**9}
# transformers' InstructBlipVisionConfig / InstructBlipQFormerConfig defaults: EVA ViT-g/14 at
# 224 px and BERT-base with cross-attention every 2nd layer.
VISION_DEFAULTS = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                   "image_size": 224, "patch_size": 14, "qkv_bias": True}  # fmt: skip
QFORMER_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "max_position_embeddings": 512, "cross_attention_frequency": 2}  # fmt: skip


def blip_hub_config(
    text_layers: int | None = None,
    vision_layers: int | None = None,
    qformer_layers: int | None = None,
    dtype: str = "bfloat16",
) -> dict:
    """Salesforce/instructblip-vicuna-7b's config.json (the revision with image tokens;
    torch_dtype aside: the hub's is float32), optionally with fewer layers. As the hub's, the
    vision and Q-Former configs name only their model type (and the Q-Former's vocabulary),
    leaving EVA ViT-g and BERT-base widths to transformers' defaults."""
    text = {
        "architectures": ["LLaMAForCausalLM"], "bos_token_id": 0, "eos_token_id": 1,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 11008, "max_sequence_length": 2048, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": text_layers or 32,
        "num_key_value_heads": 32, "pad_token_id": BLIP_PAD_ID, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float16", "vocab_size": BLIP_VOCAB,
    }  # fmt: skip
    vision: dict = {"model_type": "instructblip_vision_model"}
    qformer: dict = {"model_type": "instructblip_qformer", "vocab_size": QFORMER_VOCAB}
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    if qformer_layers:
        qformer["num_hidden_layers"] = qformer_layers
    return {
        "architectures": ["InstructBlipForConditionalGeneration"],
        "image_token_index": BLIP_IMAGE_ID, "initializer_factor": 1.0,
        "initializer_range": 0.02, "model_type": "instructblip",
        "num_query_tokens": BLIP_QUERY_TOKENS, "qformer_config": qformer, "text_config": text,
        "tie_word_embeddings": False, "torch_dtype": dtype,
        "transformers_version": "4.46.0.dev0", "use_decoder_only_language_model": True,
        "vision_config": vision,
    }  # fmt: skip


def blip_tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, HF shape, init) of every InstructBLIP tensor in transformers' state-dict order
    (query tokens, ViT, Q-Former, projection, LM); init as in `tensor_specs`, plus "qkv_bias"
    (normal with a zero key third). Vision and Q-Former fields missing from the config take
    transformers' defaults (VISION_DEFAULTS, QFORMER_DEFAULTS; the Q-Former's
    encoder_hidden_size is the vision width, as InstructBlipConfig sets it)."""
    t = config["text_config"]
    v = {**VISION_DEFAULTS, **config["vision_config"]}
    q = {**QFORMER_DEFAULTS, "encoder_hidden_size": v["hidden_size"], **config["qformer_config"]}
    d = t["hidden_size"]
    dv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    dq, iq = q["hidden_size"], q["intermediate_size"]
    out: list[tuple[str, tuple[int, ...], str]] = []
    linear, layer_norm = spec_writers(out)

    out.append(("query_tokens", (1, config["num_query_tokens"], dq), "normal"))
    vm = "vision_model"
    out += [
        (f"{vm}.embeddings.class_embedding", (1, 1, dv), "normal"),
        (f"{vm}.embeddings.position_embedding", (1, (v["image_size"] // p) ** 2 + 1, dv),
         "normal"),
    ]  # fmt: skip
    out.append((f"{vm}.embeddings.patch_embedding.weight", (dv, 3, p, p), "normal"))
    out.append((f"{vm}.embeddings.patch_embedding.bias", (dv,), "normal"))
    for i in range(v["num_hidden_layers"]):
        pre = f"{vm}.encoder.layers.{i}"
        out.append((f"{pre}.self_attn.qkv.weight", (3 * dv, dv), "normal"))
        if v.get("qkv_bias", True):
            out.append((f"{pre}.self_attn.qkv.bias", (3 * dv,), "qkv_bias"))
        linear(f"{pre}.self_attn.projection", dv, dv)
        layer_norm(f"{pre}.layer_norm1", dv)
        linear(f"{pre}.mlp.fc1", iv, dv)
        linear(f"{pre}.mlp.fc2", dv, iv)
        layer_norm(f"{pre}.layer_norm2", dv)
    layer_norm(f"{vm}.post_layernorm", dv)
    qf = "qformer"
    out.append((f"{qf}.embeddings.word_embeddings.weight", (q["vocab_size"], dq), "normal"))
    out.append((f"{qf}.embeddings.position_embeddings.weight",
                (q["max_position_embeddings"], dq), "normal"))  # fmt: skip
    layer_norm(f"{qf}.embeddings.layernorm", dq)
    for i in range(q["num_hidden_layers"]):
        pre = f"{qf}.encoder.layer.{i}"
        blocks = [("attention", dq)]
        if i % q["cross_attention_frequency"] == 0:
            blocks.append(("crossattention", q["encoder_hidden_size"]))
        for block, kv_in in blocks:
            linear(f"{pre}.{block}.attention.query", dq, dq)
            linear(f"{pre}.{block}.attention.key", dq, kv_in)
            linear(f"{pre}.{block}.attention.value", dq, kv_in)
            linear(f"{pre}.{block}.output.dense", dq, dq)
            layer_norm(f"{pre}.{block}.output.LayerNorm", dq)
        for suffix in ("", "_query"):
            linear(f"{pre}.intermediate{suffix}.dense", iq, dq)
            linear(f"{pre}.output{suffix}.dense", dq, iq)
            layer_norm(f"{pre}.output{suffix}.LayerNorm", dq)
    linear("language_projection", d, dq)
    return out + llama_specs(t)


def build_blip_tokenizer(out_dir: str):
    """The WordLevel stand-in for the hub's Vicuna tokenizer, all 32064 ids (module
    docstring), saved to out_dir."""
    from vicrop_jax.testing import BLIP_WORDS, WORDS

    return filled_wordlevel(
        out_dir, (*WORDS, *BLIP_WORDS), {"[PAD]": BLIP_PAD_ID, "<image>": BLIP_IMAGE_ID},
        BLIP_VOCAB, bos_token="</s>", eos_token="</s>", pad_token="[PAD]",
        truncation_side="left",
    )  # fmt: skip


def build_qformer_tokenizer():
    """The WordLevel stand-in for the Q-Former's bert-base-uncased + `[DEC]` tokenizer, all
    30523 ids with BERT's special ids (module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vicrop_jax.testing import BLIP_WORDS, WORDS

    split = pre_tokenizers.BertPreTokenizer()
    vocab = {f"[unused{i}]": i for i in range(1, 100)} | QFORMER_SPECIALS
    words = (w for text in (*WORDS, *BLIP_WORDS) for w, _ in split.pre_tokenize_str(text.lower()))
    for w in words:
        vocab.setdefault(w, len(vocab))
    fill = iter(range(QFORMER_VOCAB))
    while len(vocab) < QFORMER_VOCAB - 1:
        vocab.setdefault(f"q{next(fill)}", len(vocab))
    vocab["[DEC]"] = QFORMER_VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]", padding_side="right",
        truncation_side="left", model_max_length=512,
    )  # fmt: skip
    got = {t: fast.convert_tokens_to_ids(t) for t in (*QFORMER_SPECIALS, "[DEC]")}
    want = QFORMER_SPECIALS | {"[DEC]": QFORMER_VOCAB - 1}
    if got != want or len(fast) != QFORMER_VOCAB:
        raise AssertionError(f"Q-Former tokenizer ids {got}, {len(fast)} entries")
    return fast


def build_blip_processor(out_dir: str, tokenizer, qformer_tokenizer, config: dict):
    """The hub's InstructBlipProcessor settings around the two tokenizers, saved to out_dir."""
    from transformers import BlipImageProcessor, InstructBlipProcessor

    side = {**VISION_DEFAULTS, **config["vision_config"]}["image_size"]
    image_processor = BlipImageProcessor(
        do_resize=True, size={"height": side, "width": side}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )  # fmt: skip
    proc = InstructBlipProcessor(
        image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=config["num_query_tokens"],
    )  # fmt: skip
    proc.save_pretrained(out_dir)
    return proc


def family_of_config(config: dict) -> str:
    """The family ("instructblip" or "llava") of config.json's model_type."""
    return "instructblip" if config.get("model_type") == "instructblip" else "llava"


def variant_config(
    family: str,
    variant: str,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    qformer_layers: int | None = None,
) -> dict:
    """The family's config for `variant`, each given depth in place of the variant's."""
    if family == "instructblip":
        t, v, q, dtype = BLIP_VARIANTS[variant]
        return blip_hub_config(text_layers or t, vision_layers or v, qformer_layers or q, dtype)
    if family != "llava":
        raise ValueError(f"--family {family!r}: choose llava or instructblip")
    if qformer_layers:
        raise ValueError("--qformer_layers is for --family instructblip")
    t, v, dtype = VARIANTS[variant]
    return hub_config(text_layers or t, vision_layers or v, dtype)


def _complete(out_dir: str, want: dict) -> bool:
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            have = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if {k: have.get(k) for k in want} != want:
        return False
    return all(
        os.path.isfile(p := os.path.join(out_dir, name)) and os.path.getsize(p) == size
        for name, size in have.get("files", {}).items()
    )


def write_checkpoint(out_dir: str, variant: str = "full", seed: int = 0,
                     shard_bytes: int | None = None, config: dict | None = None,
                     family: str = "llava") -> dict:  # fmt: skip
    """Writes (or finds complete) a random checkpoint of `variant` in out_dir.

    Args:
      out_dir: the checkpoint directory (created).
      variant: "full" or "wide2" (module docstring).
      seed: weights seed.
      shard_bytes: the largest shard; default the hub's (LLaVA 5 GB, InstructBLIP 10 GB).
      config: an HF LlavaConfig or InstructBlipConfig dict in place of the variant's (tests
        and narrow runs write small ones; its model_type gives the family); its torch_dtype
        gives the weights' dtype.
      family: "llava" or "instructblip", when config is None.

    Returns:
      {"written": bool, "seconds", "total_size" (weight bytes), "files" {name: bytes}}.
    """
    if config is None:
        config = variant_config(family, variant)
    family = family_of_config(config)
    if shard_bytes is None:
        shard_bytes = SHARD_BYTES[family]
    dtype = config["torch_dtype"]
    want = {"variant": variant, "seed": seed, "shard_bytes": shard_bytes, "config": config}
    if _complete(out_dir, want):
        with open(os.path.join(out_dir, MARKER)) as f:
            return {**json.load(f), "written": False, "seconds": 0.0}
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    for stale in (MARKER, INDEX, "model.safetensors"):
        if os.path.exists(p := os.path.join(out_dir, stale)):
            os.remove(p)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if family == "instructblip":
        gen = {"bos_token_id": BLIP_EOS_ID, "eos_token_id": BLIP_EOS_ID,
               "pad_token_id": BLIP_PAD_ID}  # fmt: skip
        tokenizer = build_blip_tokenizer(out_dir)
        build_blip_processor(out_dir, tokenizer, build_qformer_tokenizer(), config)
    else:
        gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_ID}
        build_processor(out_dir, build_tokenizer(out_dir), config)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    weights = write_weights(out_dir, config, dtype, seed, shard_bytes)
    record = {**want, **weights}
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump(record, f, indent=2)
    return {**record, "written": True, "seconds": time.perf_counter() - t0}


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _define_flags():
    """The command line's flags (defined only when run as a program: bench.fullsize_parity
    imports this module)."""
    flags.DEFINE_string("out", None, "checkpoint directory (created)")
    flags.DEFINE_enum("family", "llava", ["llava", "instructblip"], "which 7B hub checkpoint")
    flags.DEFINE_enum("variant", "full", ["full", "wide2"], "see the module docstring")
    flags.DEFINE_integer("seed", 0, "weights seed")
    flags.DEFINE_float("shard_gb", None, "largest shard, GB (10^9 bytes); default the hub's")
    flags.DEFINE_integer("text_layers", None, "LM layers in place of the variant's")
    flags.DEFINE_integer("vision_layers", None, "vision tower layers in place of the variant's")
    flags.DEFINE_integer("qformer_layers", None, "Q-Former layers (InstructBLIP)")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.out:
        raise ValueError("--out is required")
    config = variant_config(f.family, f.variant, f.text_layers, f.vision_layers, f.qformer_layers)
    shard_bytes = None if f.shard_gb is None else int(f.shard_gb * 1e9)
    r = write_checkpoint(f.out, f.variant, f.seed, shard_bytes, config)
    depth = f"{r['config']['text_config'].get('num_hidden_layers', 32)} LM layers"
    verb = "wrote" if r["written"] else "complete already:"
    print(f"{verb} {f.out} ({f.family} {f.variant}, {depth}, seed {f.seed}): "
          f"{r['total_size'] / 1e9:.2f} GB of weights in {len(r['files'])} shard(s) "
          f"in {r['seconds']:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
