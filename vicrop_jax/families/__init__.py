"""Model families: everything the ViCrop method asks of a model, one adapter per family.

`loading`, `importance`, `pipeline` and the evaluation engine hold no per-family branches;
they ask the family of a model (`family_of(model)`) for:

  config_type, module_type         the frozen config (from config.json) and the Flax module
  models, converter                its models file (param-tree helpers) and convert/ table
  prompt(question, n_images)       the official prompt template with n images
  image_placeholder                the text that stands for one image in a prompt (or None)
  default_layer(config)            the paper's LM layer (or the same relative depth)
  map_grid(config)                 the side N of the square map over the original image
  control_map_shape(config, size)  (rows, cols) of an image's map (Qwen2.5-VL: its merged
                                   grid), the grid of the gt_map control's ideal map
  base_size(config)                the box search's base size (the vision input side)
  high_res_threshold               the official tile size of the *_high variants
  shares_prompt_prefix             whether every prompt starts with the same tokens through
                                   the first image, so one KV cache of that prefix serves
                                   the baseline, the map and the crop answer
                                   (vicrop_jax.prompt_cache)
  load_processor(path, **options)  the family's own processor (Qwen2.5-VL's image-only one,
                                   options: max_pixels), or None for the HF AutoProcessor
  encode(processor, texts, images) the processor's arrays of prompts and their images
  image_tokens(config, n, sizes)   image tokens of n images in a prompt (anyres: by size)
  bucket_inputs(config, enc, m)    prompt lengths bucketed for fewer compiled shapes
                                   (anyres: one program a pinpoint)
  model_inputs(config, enc)        the module's pixels and further prefill inputs from the
                                   processor's arrays (Q-Former prompt, anyres packing table)
  map_pixels(config, enc, n)       the first n images' pixels at the map's input side
  detail_masks(config, images, enc) pure-grad's detail masks as its `maps` takes them
  maps(...)                        the jitted pure cores of rel_att, grad_att and pure_grad
                                   ([B, N, N], or one map a image where the grid follows
                                   the image's size: LLaVA-NeXT's tiles grid)
  image_maps(config, maps, enc)    `maps`' output as maps_for_images returns it (Qwen2.5-VL:
                                   each [Hm, Wm] map cut to its image's merged grid)
  map_options(config, **options)   validated static options of its cores (InstructBLIP's
                                   qformer_layer, LLaVA-NeXT's map_source)
  partition_rules(config)          the params' layout on a (data, model) mesh, and
  model_split_sizes(config)        the dimensions it splits over the model axis (declared
                                   in the models file; vicrop_jax.sharding)

A new family is a models file (vicrop_jax/models/), a converter table (convert/), an adapter
here registered in FAMILIES, and their tests.
"""

from __future__ import annotations

from vicrop_jax.families.base import Family
from vicrop_jax.families.instructblip import INSTRUCTBLIP
from vicrop_jax.families.llava import LLAVA
from vicrop_jax.families.llava_next import LLAVA_NEXT
from vicrop_jax.families.qwen2_5_vl import QWEN2_5_VL
from vicrop_jax.models.qwen2_5_vl import UNSUPPORTED_MODEL_TYPES

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAVA, INSTRUCTBLIP, LLAVA_NEXT, QWEN2_5_VL)}
# Model types refused by name, with the reason (neighbours of a supported family).
NOT_SUPPORTED: dict[str, str] = {
    mt: "only Qwen2.5-VL (model_type 'qwen2_5_vl') of the Qwen VL families is ported"
    for mt in UNSUPPORTED_MODEL_TYPES
}


def get_family(name: str) -> Family:
    """The adapter of a family name (a config's model_type)."""
    if name in NOT_SUPPORTED:
        raise ValueError(f"model_type {name!r} is not supported: {NOT_SUPPORTED[name]}")
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unsupported model family {name!r}; supported: {', '.join(FAMILIES)}"
        ) from None


def family_of(model) -> Family:
    """The adapter of a Model (or of a config with a model_type)."""
    config = getattr(model, "config", model)
    return get_family(config.model_type)


__all__ = ["FAMILIES", "NOT_SUPPORTED", "Family", "family_of", "get_family"]
