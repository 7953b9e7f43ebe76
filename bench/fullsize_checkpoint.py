"""A random LLaVA-1.5-7B checkpoint in the hub's own layout, written one tensor at a time.

  python -m bench.fullsize_checkpoint --out /tmp/llava7b --variant full    # 14 GB, bf16
  python -m bench.fullsize_checkpoint --out /tmp/llava7b_wide2 --variant wide2  # 2.9 GB, f32

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


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(hub key, HF shape, init) of every tensor, in the hub's state-dict order (vision tower,
    projector, language model); init is "normal", "ones" or "zeros". Widths missing from the
    config take transformers' defaults (LlamaConfig: Vicuna-7B's)."""
    t, v = config["text_config"], config["vision_config"]
    d, inter = t.get("hidden_size", 4096), t.get("intermediate_size", 11008)
    heads = t.get("num_attention_heads", 32)
    kv = t.get("num_key_value_heads") or heads
    kv_width = kv * t.get("head_dim", d // heads)
    dv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    positions = (v["image_size"] // p) ** 2 + 1
    layers = config["vision_feature_layer"]
    n_feat = 1 if isinstance(layers, int) else len(layers)
    out: list[tuple[str, tuple[int, ...], str]] = []

    def linear(name, o, i, bias=True):
        out.append((f"{name}.weight", (o, i), "normal"))
        if bias:
            out.append((f"{name}.bias", (o,), "normal"))

    def layer_norm(name, n):
        out.extend([(f"{name}.weight", (n,), "ones"), (f"{name}.bias", (n,), "zeros")])

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
    lm = "language_model.model"
    out.append((f"{lm}.embed_tokens.weight", (t["vocab_size"], d), "normal"))
    for i in range(t.get("num_hidden_layers", 32)):
        pre = f"{lm}.layers.{i}"
        linear(f"{pre}.self_attn.q_proj", d, d, bias=False)
        linear(f"{pre}.self_attn.k_proj", kv_width, d, bias=False)
        linear(f"{pre}.self_attn.v_proj", kv_width, d, bias=False)
        linear(f"{pre}.self_attn.o_proj", d, d, bias=False)
        linear(f"{pre}.mlp.gate_proj", inter, d, bias=False)
        linear(f"{pre}.mlp.up_proj", inter, d, bias=False)
        linear(f"{pre}.mlp.down_proj", d, inter, bias=False)
        out.append((f"{pre}.input_layernorm.weight", (d,), "ones"))
        out.append((f"{pre}.post_attention_layernorm.weight", (d,), "ones"))
    out.append((f"{lm}.norm.weight", (d,), "ones"))
    linear("language_model.lm_head", t["vocab_size"], d, bias=False)
    return out


def make_tensor(name: str, shape: tuple[int, ...], init: str, dtype: str, seed: int) -> np.ndarray:
    """One tensor's values: its own generator, seeded by (seed, crc32 of the key)."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    if init == "ones":
        return np.ones(shape, np_dtype)
    if init == "zeros":
        return np.zeros(shape, np_dtype)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= INIT_STD
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


def build_tokenizer(out_dir: str):
    """The WordLevel stand-in for the hub's tokenizer, all 32064 ids (module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    from vicrop_jax.testing import WORDS

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    fill = iter(range(VOCAB))
    while len(vocab) < IMAGE_ID:
        vocab.setdefault(f"w{next(fill)}", len(vocab))
    vocab["<image>"], vocab["<pad>"] = IMAGE_ID, PAD_ID
    while len(vocab) < VOCAB:
        vocab[f"<extra_{len(vocab) - PAD_ID - 1}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", padding_side="left",
    )  # fmt: skip
    fast.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]}
    )
    fast.add_bos_token = True
    got = {t: fast.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    want = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": IMAGE_ID, "<pad>": PAD_ID}
    if got != want or len(fast) != VOCAB:
        raise AssertionError(f"tokenizer ids {got}, {len(fast)} entries; want {want}, {VOCAB}")
    fast.save_pretrained(out_dir)
    return fast


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
                     shard_bytes: int = 5 * 10**9, config: dict | None = None) -> dict:  # fmt: skip
    """Writes (or finds complete) a random checkpoint of `variant` in out_dir.

    Args:
      out_dir: the checkpoint directory (created).
      variant: "full" or "wide2" (module docstring).
      seed: weights seed.
      shard_bytes: the largest shard (the hub's 5 GB).
      config: an HF LlavaConfig dict in place of the variant's (tests write small ones);
        its torch_dtype gives the weights' dtype.

    Returns:
      {"written": bool, "seconds", "total_size" (weight bytes), "files" {name: bytes}}.
    """
    if config is None:
        text_layers, vision_layers, dtype = VARIANTS[variant]
        config = hub_config(text_layers, vision_layers, dtype)
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
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_ID}, f, indent=2)
    tokenizer = build_tokenizer(out_dir)
    build_processor(out_dir, tokenizer, config)
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
    flags.DEFINE_enum("variant", "full", ["full", "wide2"], "see the module docstring")
    flags.DEFINE_integer("seed", 0, "weights seed")
    flags.DEFINE_float("shard_gb", 5.0, "largest shard, GB (10^9 bytes)")
    flags.DEFINE_integer("text_layers", None, "LM layers in place of the variant's")
    flags.DEFINE_integer("vision_layers", None, "CLIP layers in place of the variant's")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.out:
        raise ValueError("--out is required")
    config = None
    if f.text_layers or f.vision_layers:
        text_layers, vision_layers, dtype = VARIANTS[f.variant]
        config = hub_config(f.text_layers or text_layers, f.vision_layers or vision_layers, dtype)
    r = write_checkpoint(f.out, f.variant, f.seed, int(f.shard_gb * 1e9), config)
    depth = f"{r['config']['text_config'].get('num_hidden_layers', 32)} LM layers"
    verb = "wrote" if r["written"] else "complete already:"
    print(f"{verb} {f.out} ({f.variant}, {depth}, seed {f.seed}): "
          f"{r['total_size'] / 1e9:.2f} GB of weights in {len(r['files'])} shard(s) "
          f"in {r['seconds']:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
