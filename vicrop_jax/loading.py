"""Loading a model directory and running a forward pass: the public entry points.

`load_model(path)` reads an HF checkpoint directory (config.json + safetensors, and the
tokenizer/processor files when present) and returns a `Model`; `forward(model, ...)` takes
arrays in HF layout (pixels NCHW, as the HF processor gives them) and returns a ModelOutput.
With a (data, model) `mesh` (vicrop_jax.sharding), the params come back laid out by their
family's partition rules: split over the model axis, replicated over the data axis.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import CheckpointError, read_config
from vicrop_jax import sharding
from vicrop_jax.families import FAMILIES, NOT_SUPPORTED, family_of
from vicrop_jax.generate import PLAIN_GREEDY, GenerationSettings
from vicrop_jax.models.common import ModelOutput, check_config_dict

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclasses.dataclass
class Model:
    """A loaded model: frozen config, params pytree, HF processor (or None), raw config dict,
    and the generation_config.json settings that every greedy decode applies."""

    config: Any
    params: Any
    processor: Any = None
    hf_config: dict | None = None
    path: str | None = None
    generation: GenerationSettings = PLAIN_GREEDY

    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def module(self):
        return module_for(self.config)

    def params_or(self, params=None):
        """`params` where given (cast, sharded or perturbed copies), else the model's own."""
        return self.params if params is None else params


@functools.cache
def module_for(config):
    """The Flax module of a config (cached: configs are frozen and hashable)."""
    return family_of(config).module_type(config)


def parse_config(d: dict):
    """config.json's dict -> the family's frozen config dataclass.

    The dict is checked first (vicrop_jax.models.common.check_config_dict): counts and sizes
    are positive ints and consistent, or one CheckpointError line names the field.
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"config.json must be a JSON object, got a {type(d).__name__}")
    mt = d.get("model_type")
    if mt is None:
        raise CheckpointError("config.json has no model_type")
    if mt in NOT_SUPPORTED:
        raise CheckpointError(f"model_type {mt!r} is not supported: {NOT_SUPPORTED[mt]}")
    if mt not in FAMILIES:
        raise CheckpointError(
            f"unsupported model_type {mt!r}; supported: {', '.join(map(repr, FAMILIES))}"
        )
    try:
        check_config_dict(FAMILIES[mt].config_type, d)
        return FAMILIES[mt].config_type.from_dict(d)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_generation_config(path: str) -> dict:
    """The directory's generation_config.json as a dict ({} when absent).

    Raises:
      CheckpointError: the file is not a JSON object.
    """
    gen = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen):
        return {}
    try:
        with open(gen, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{gen} is not a JSON object ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{gen} is not a JSON object (a {type(d).__name__})")
    return d


def generation_settings(path: str) -> GenerationSettings:
    """The generation settings HF generate(do_sample=False) applies for the directory, for
    every family: generation_config.json's; without the file, what transformers derives from
    config.json (GenerationConfig.from_model_config: its top-level keys, the text config's
    where the top level has none), which legacy configs fill with generation defaults.

    Raises:
      CheckpointError: one line naming the file and a setting that changes greedy decoding
        but is not implemented (vicrop_jax.generate.GenerationSettings).
    """
    gen = os.path.join(path, "generation_config.json")
    d = read_generation_config(path)
    if not os.path.isfile(gen):
        hf = read_config(path)
        hf = hf if isinstance(hf, dict) else {}  # parse_config names that problem
        gen = os.path.join(path, "config.json")
        text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
        d = {**text, **{k: v for k, v in hf.items() if v is not None}}
    try:
        return GenerationSettings.from_generation_config(d)
    except ValueError as e:
        raise CheckpointError(f"{gen}: {e}") from None


def _generation_eos(gen: dict, config):
    """generation_config.json's eos_token_id, which generate() reads, in place of the
    config's (for families whose hub configs carry stale ids)."""
    eos = gen.get("eos_token_id")
    if eos is None:
        return config
    eos = tuple(eos) if isinstance(eos, list) else eos
    text = dataclasses.replace(config.text_config, eos_token_id=eos)
    return dataclasses.replace(config, text_config=text)


def load_processor(path: str):
    """The directory's own HF processor (tokenizer + image processor), offline; None if absent."""
    names = set(os.listdir(path))
    if not (names & set(_PROCESSOR_FILES)) or not (names & set(_TOKENIZER_FILES)):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


# A tower deeper than this is measured on copies of _PROBE_LAYERS and 2 * _PROBE_LAYERS layers
# and extrapolated, not traced whole: tracing takes 10-30 ms a layer on the CPU, so a config
# with a million layers would trace for hours before its size could be seen. Real towers have
# at most ~130 layers; 6 and 12 are multiples of the Q-Former cross-attention periods 1, 2, 3.
_TRACED_LAYERS = 128
_PROBE_LAYERS = 6


def _layer_counts(config, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], int]]:
    """(field path, value) of every layer count in a config and its nested configs
    (`num_hidden_layers`; `depth`, Qwen2.5-VL's vision tower)."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out += _layer_counts(value, (*prefix, f.name))
        elif f.name in ("num_hidden_layers", "depth"):
            out.append(((*prefix, f.name), value))
    return out


def _replace(config, path: tuple[str, ...], value):
    """A copy of a nested frozen config with the field at `path` set to `value`."""
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    inner = _replace(getattr(config, path[0]), path[1:], value)
    return dataclasses.replace(config, **{path[0]: inner})


def param_bytes(tree) -> int:
    """Bytes of a param tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _estimate_bytes(family, config, dtype, deep) -> int:
    """Param bytes of `config`, whose `deep` layer counts are too many to trace: bytes are
    affine in each tower's layer count, so two shallow copies per tower give the slope."""
    base = config
    for path, _ in deep:
        base = _replace(base, path, _PROBE_LAYERS)
    b0 = param_bytes(family.abstract_params(base, dtype))
    total = b0
    for path, n in deep:
        b1 = param_bytes(family.abstract_params(_replace(base, path, 2 * _PROBE_LAYERS), dtype))
        total += (b1 - b0) * (n - _PROBE_LAYERS) // _PROBE_LAYERS
    return total


def available_host_bytes() -> int | None:
    """Memory the host can still give: MemAvailable (/proc/meminfo), capped by a cgroup v2
    limit, else free pages (os.sysconf); None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                avail = min(avail, int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return avail


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} PiB"


def _check_fits(need: int, dtype, where: str, detail: str = "") -> None:
    avail = available_host_bytes()
    if avail is not None and need > avail:
        raise CheckpointError(
            f"{where}: the model's params need {_human(need)} as {np.dtype(dtype).name} but the "
            f"host has {_human(avail)} available{detail}"
        )


def checked_abstract_params(config, dtype=jnp.float32) -> dict:
    """The param tree of `config`'s model as ShapeDtypeStructs, refused with one line before it
    is traced or allocated when the params would not fit in the host's available memory.

    Raises:
      CheckpointError: the params need more bytes than the host has available.
    """
    family = family_of(config)
    deep = [(p, n) for p, n in _layer_counts(config) if n > _TRACED_LAYERS]
    if deep:
        fields = ", ".join(f"{'.'.join(p)} = {n}" for p, n in deep)
        _check_fits(_estimate_bytes(family, config, dtype, deep), dtype, f"config.json {fields}")
    expected = family.abstract_params(config, dtype)
    keys, leaf = max(
        jax.tree_util.tree_leaves_with_path(expected), key=lambda kv: math.prod(kv[1].shape)
    )
    largest = "/".join(str(getattr(k, "key", k)) for k in keys)
    _check_fits(param_bytes(expected), dtype, "config.json",
                f" (the largest param: {largest} {list(leaf.shape)})")  # fmt: skip
    return expected


def check_mesh(config, mesh) -> None:
    """Refuses a mesh whose model axis does not divide a dimension that `config`'s family
    splits over it (heads, key/value heads, MLP hidden, vocabulary).

    Raises:
      ValueError: one line naming the dimension.
    """
    sizes = family_of(config).model_split_sizes(config)
    sharding.check_model_axis(sizes, sharding.axis_size(mesh, sharding.MODEL))


def param_specs(config, params):
    """The PartitionSpec of every param of `config`'s model (a tree like `params`, which
    may be arrays or ShapeDtypeStructs), by its family's partition rules."""
    return sharding.param_specs(params, family_of(config).partition_rules(config))


def sharded_abstract_params(config, mesh, dtype=jnp.float32, abstract=None) -> dict:
    """The abstract params (ShapeDtypeStructs) of `config`'s model, each carrying its
    NamedSharding on `mesh`; checked with `check_mesh` first. abstract: the tree without
    shardings, if already built."""
    check_mesh(config, mesh)
    abstract = family_of(config).abstract_params(config, dtype) if abstract is None else abstract
    return sharding.with_shardings(abstract, mesh, param_specs(config, abstract))


def shard_params(params, config, mesh):
    """`params` laid out on `mesh` by the family's rules, one device_put per param (a param
    already in its layout stays where it is)."""
    check_mesh(config, mesh)
    return sharding.place_tree(params, mesh, param_specs(config, params))


def load_params(path: str, config, dtype=jnp.float32, check_finite: bool = True,
                mesh=None) -> dict:  # fmt: skip
    """The weights of checkpoint directory `path` as the params pytree of `config`'s model.

    Strict: every checkpoint key is used and every param filled with the right shape and a
    float dtype, or one CheckpointError lists all offenders (convert.checkpoint.map_checkpoint).
    The params' size is checked against the host's available memory before any file is read,
    and a mesh against the model's dimensions (`check_mesh`).

    Args:
      path: directory with *.safetensors (sharded or not).
      config: the family's config (vicrop_jax.families) of the model the weights are for.
      dtype: dtype of the floating-point params (float32 or bfloat16).
      check_finite: refuse weights holding NaN or inf, naming the tensors (one pass over the
        data on the host).
      mesh: a (data, model) Mesh (vicrop_jax.sharding): the params come back in the family's
        layout on it (the expected tree's leaves carry their shardings, which the loader
        builds each param in); None: one device.
    """
    if mesh is not None:
        check_mesh(config, mesh)
    expected = checked_abstract_params(config, dtype)
    if mesh is not None:
        expected = sharded_abstract_params(config, mesh, dtype, expected)
    params = family_of(config).converter.load_params(path, expected, check_finite=check_finite)
    if mesh is not None:  # a param the loader did not build in its layout is moved there
        params = jax.tree.map(_placed, params, expected)
    return params


def _placed(x, like):
    """x in like.sharding, split from the host copy (no device program per shape)."""
    if isinstance(x, jax.Array) and x.sharding == like.sharding:
        return x
    return jax.device_put(np.asarray(x), like.sharding)


def load_model(
    path: str,
    dtype=jnp.float32,
    processor: bool = True,
    check_finite: bool = True,
    mesh=None,
    processor_options: dict | None = None,
) -> Model:
    """Loads an HF checkpoint directory.

    Each problem with the directory, its config or its weights is one CheckpointError, raised
    before anything large is read or allocated where it can be (see load_params).

    Args:
      path: directory with config.json and *.safetensors (sharded or not).
      dtype: dtype of the floating-point params (float32 or bfloat16).
      processor: also load the directory's tokenizer/image processor when present.
      check_finite: refuse weights holding NaN or inf (False accepts them).
      mesh: a (data, model) Mesh: params laid out on it (see load_params); None: one device.
      processor_options: the family's processor settings (Qwen2.5-VL: max_pixels).

    Returns:
      Model with .config, .params, .processor (None when the directory has none) and
      .generation (generation_config.json's settings, see `generation_settings`).
    """
    path = os.fspath(path)
    hf = read_config(path)
    config = parse_config(hf)
    generation = generation_settings(path)
    if family_of(config).eos_from_generation_config:
        config = _generation_eos(read_generation_config(path), config)
    params = load_params(path, config, dtype, check_finite, mesh)
    proc = None
    if processor:
        options = processor_options or {}
        proc = family_of(config).load_processor(path, **options) or load_processor(path)
    return Model(config=config, params=params, processor=proc, hf_config=hf, path=path,
                 generation=generation)  # fmt: skip


def count_image_tokens(input_ids: np.ndarray, token: int) -> int:
    return int((np.asarray(input_ids) == token).sum())


def check_inputs(config, input_ids, pixel_values, qformer_input_ids=None,
                 image_sizes=None, image_grid_thw=None) -> None:  # fmt: skip
    """Host-side checks with clear messages (traced code cannot raise on values)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt has no tokens")
    n_tok = count_image_tokens(ids, config.image_token_index)
    n_img = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    token_counts = getattr(family_of(config).models, "image_token_counts", None)
    if token_counts is not None:  # dynamic resolution: counts follow from each image's grid
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("image_grid_thw is required with pixel_values (one row an image)")
        per = [] if image_grid_thw is None else token_counts(config, image_grid_thw).tolist()
        if n_tok != sum(per):
            raise ValueError(
                f"the prompt has {n_tok} image tokens but image_grid_thw's {len(per)} images "
                f"need {sum(per)} ({per} per image); use the model's processor to expand each "
                "image placeholder"
            )
        return
    if image_sizes is not None:  # anyres: each image's count follows from its size
        per = [
            config.image_token_count(int(h), int(w)) for h, w in np.reshape(image_sizes, (-1, 2))
        ]
        want, per_text = sum(per), f"{per} per image"
    else:
        want, per_text = n_img * config.num_image_tokens, f"{config.num_image_tokens} per image"
    if n_tok != want:
        raise ValueError(
            f"the prompt has {n_tok} image tokens but {n_img} images were given, which need "
            f"{want} ({per_text}); use the model's processor to expand each <image> placeholder"
        )
    if pixel_values is not None:
        v = config.vision_config
        shape = tuple(np.shape(pixel_values))
        if image_sizes is not None:
            shape = shape[:1] + shape[2:]  # [images, tiles, C, H, W]
        if len(shape) != 4 or shape[1:] != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(
                f"pixel_values must be [images, {v.num_channels}, {v.image_size}, "
                f"{v.image_size}] (NCHW, as the HF processor gives), got {shape}"
            )
    if qformer_input_ids is not None and hasattr(config, "qformer_config"):
        q = np.asarray(qformer_input_ids)
        if q.ndim != 2 or q.shape[0] != n_img:
            raise ValueError(
                f"qformer_input_ids must be [images, length] with one row per image ({n_img}), "
                f"got shape {q.shape}"
            )
        limit = config.qformer_config.max_position_embeddings
        if q.shape[1] > limit:
            raise ValueError(f"the Q-Former instruction has {q.shape[1]} tokens; at most {limit}")


@functools.partial(jax.jit, static_argnames=("module", "full"))
def _forward(module, params, input_ids, pixel_values, attention_mask, attn_delta, full, extra):
    return module.apply(
        {"params": params}, input_ids, pixel_values, attention_mask,
        attn_delta=attn_delta, output_full_attentions=full, **extra,
    )  # fmt: skip


def nchw_to_nhwc(pixel_values):
    return None if pixel_values is None else jnp.transpose(jnp.asarray(pixel_values), (0, 2, 3, 1))


def forward(
    model: Model,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    *,
    attn_delta=None,
    output_full_attentions: bool = False,
    qformer_input_ids=None,
    qformer_attention_mask=None,
    qformer_delta=None,
    image_sizes=None,
    image_grid_thw=None,
) -> ModelOutput:
    """One jitted forward pass.

    Args:
      model: from load_model.
      input_ids: int[B, S], image tokens already expanded (as the HF processor does).
      pixel_values: float[I, C, H, W] (NCHW, HF layout) for the I images, in prompt order.
      attention_mask: int[B, S], 0 marks left padding.
      attn_delta: optional float[L, B, N, S] added to each layer's last-query attention row.
      output_full_attentions: also return [L, B, N, S, S].
      qformer_input_ids, qformer_attention_mask: InstructBLIP only: int[I, L], the
        instruction in the Q-Former's vocabulary, one row per image (as the processor gives).
      qformer_delta: InstructBLIP only: float[C, I, N, T, P] added to the cross-attentions.
      image_sizes: LLaVA-NeXT only: int[I, 2] (height, width) as the processor gives, with
        pixel_values float[I, tiles, C, H, W].
      image_grid_thw: Qwen2.5-VL only: int[I, 3] each image's patch grid as the processor
        gives, with pixel_values float[patches, F] (the processor's flattened patches).

    Returns:
      ModelOutput: .logits float32[B, S, V], .attentions float32[L, B, N, S] (last query rows);
      InstructBLIP also .qformer_cross_attentions float32[C, I, N, T, P].
    """
    check_inputs(model.config, input_ids, pixel_values, qformer_input_ids, image_sizes,
                 image_grid_thw)  # fmt: skip
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    extra = {}
    if qformer_input_ids is not None:
        extra["qformer_input_ids"] = jnp.asarray(qformer_input_ids, jnp.int32)
    if qformer_attention_mask is not None:
        extra["qformer_attention_mask"] = jnp.asarray(qformer_attention_mask, jnp.int32)
    if qformer_delta is not None:
        extra["qformer_delta"] = qformer_delta
    if image_grid_thw is not None and pixel_values is not None:
        enc = {"input_ids": input_ids, "attention_mask": attention_mask,
               "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}  # fmt: skip
        pixels, more = family_of(model).model_inputs(model.config, enc)
        extra.update({k: jnp.asarray(v) for k, v in more.items()})
    elif image_sizes is not None and pixel_values is not None:
        pixels, extra["pack_index"] = family_of(model).models.anyres_inputs(
            model.config, pixel_values, image_sizes
        )
    else:
        pixels = nchw_to_nhwc(pixel_values)
    return _forward(
        model.module, model.params, ids, pixels, mask, attn_delta,
        output_full_attentions, extra,
    )  # fmt: skip
