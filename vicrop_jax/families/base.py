"""The family adapter interface and what most families share."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from vicrop_jax.detail_mask import detail_masks
from vicrop_jax.maps import relative_depth, resolve_layers


class Family:
    """What the ViCrop method asks of a model family (see vicrop_jax.families).

    Subclasses set `name`, `paper_layer`, the model and converter fields and implement
    `prompt` and `maps`; the defaults
    cover a tower whose square input is `config.vision_config.image_size` pixels and whose
    map is `config.vision_config.grid` cells a side.
    """

    name: ClassVar[str]
    # The models file and converter table of the family: config dataclass (from_dict), Flax
    # module, param-tree helpers, and the convert/ module (load_params(path, expected,
    # check_finite), export_params(params)).
    config_type: ClassVar[type]
    module_type: ClassVar[type]
    models: ClassVar[Any]
    converter: ClassVar[Any]
    # Whether generation_config.json's eos_token_id overrides the config's (as generate() does).
    eos_from_generation_config: ClassVar[bool] = False
    # (layer, depth): the paper's LM layer, chosen on held-out TextVQA, for a depth-layer LM.
    paper_layer: ClassVar[tuple[int, int]]
    image_placeholder: ClassVar[str | None] = "<image>"
    shares_prompt_prefix: ClassVar[bool] = False
    # Official *_high variants: tiles of at most this many pixels a side.
    high_res_threshold: ClassVar[int] = 1024

    def prompt(self, question: str, n_images: int = 1) -> str:
        raise NotImplementedError

    def load_processor(self, path: str, **options):
        """The family's own processor of a checkpoint directory, or None to use the
        directory's HF processor (AutoProcessor, vicrop_jax.loading.load_processor).
        options: the family's processor settings (none by default)."""
        del path
        if options:
            raise ValueError(f"{', '.join(options)}: no processor option of {self.name} models")
        return None

    def encode(self, processor, texts: list[str], images: list, pad_to_multiple_of=None):
        """The processor's arrays of `prompt` texts and their images (flattened in prompt
        order): vicrop_jax.processing.encode by default."""
        # Imported here: vicrop_jax.processing imports the family modules.
        from vicrop_jax.processing import encode

        return encode(processor, texts, images, pad_to_multiple_of)

    def image_maps(self, config, maps, enc: dict) -> list:
        """`maps`' output -> what maps_for_images returns: [B, N, N], or a list of B
        float32[h_i, w_i] where the grid follows each image's size (enc: the processor's
        arrays of the maps' prompts); `maps` unchanged by default."""
        del config, enc
        return maps

    def abstract_params(self, config, dtype):
        """The param tree as ShapeDtypeStructs (nothing allocated)."""
        return self.models.abstract_params(config, dtype)

    def partition_rules(self, config):
        """((regex over a param's path, PartitionSpec), ...): the params' layout on a (data,
        model) mesh, declared in the models file (vicrop_jax.sharding)."""
        return self.models.partition_rules(config)

    def model_split_sizes(self, config) -> dict[str, int]:
        """{config field: size} of every dimension the rules split over the model axis."""
        return self.models.model_split_sizes(config)

    def default_layer(self, config) -> int:
        layer, depth = self.paper_layer
        return relative_depth(layer, depth, config.text_config.num_hidden_layers)

    def layers(self, config, layer=None) -> tuple[int, ...]:
        """The LM layers a map reads: `layer` resolved, or the paper's default."""
        nl = config.text_config.num_hidden_layers
        return resolve_layers(self.default_layer(config) if layer is None else layer, nl)

    def base_size(self, config) -> int:
        """The official box search's base size: the vision tower's input side."""
        return config.vision_config.image_size

    def map_grid(self, config) -> int:
        return config.vision_config.grid

    def control_map_shape(self, config, image_size, processor=None) -> tuple[int, int]:
        """(rows, cols) of the map this family's methods give an image of image_size
        ((width, height)): the grid an ideal map of the gt_map control is drawn on."""
        del image_size, processor
        n = self.map_grid(config)
        return n, n

    def grid_map(self, config, values):
        """Image-token values [B, T] -> the map [B, N, N] (pure; used inside jit), for
        families whose image tokens are the patches themselves."""
        raise NotImplementedError(f"{self.name} image tokens are not a patch grid")

    def prompt_tokens(self, tokenizer, config, question: str, n_images: int,
                      image_sizes=None, processor=None) -> int:  # fmt: skip
        """Prompt length in tokens once every image's tokens are in place; image_sizes:
        (width, height) of the images, for families whose token count follows the size;
        processor: the model's, for families whose image token count it sets (unused here)."""
        del processor
        prompt = self.prompt(question, n_images)
        ids = tokenizer(prompt)["input_ids"]
        # A placeholder is one added token that the processor expands to the image's tokens;
        # families without one get the image tokens in front of the text (InstructBLIP).
        placeholders = prompt.count(self.image_placeholder) if self.image_placeholder else 0
        return len(ids) - placeholders + self.image_tokens(config, n_images, image_sizes)

    def image_tokens(self, config, n_images: int, image_sizes=None) -> int:
        """Image tokens of n images in a prompt (a fixed count per image by default)."""
        del image_sizes
        return n_images * config.num_image_tokens

    def bucket_inputs(self, config, enc: dict, multiple: int | None) -> dict:
        """The processor's arrays with prompt lengths bucketed for fewer compiled shapes
        (`multiple`: the processor already padded to it; None: no bucketing)."""
        del config, multiple
        return enc

    def model_inputs(self, config, enc: dict):
        """The processor's arrays -> (pixels of the module's pass, float[I, H, W, C] NHWC;
        further keyword inputs of the prefill, a dict of arrays)."""
        del config
        return np.transpose(enc["pixel_values"], (0, 2, 3, 1)), {}

    def map_pixels(self, config, enc: dict, n: int):
        """float[n, H, W, C] NHWC: the first n images' pixels at the map's input side."""
        del config
        return np.transpose(enc["pixel_values"][:n], (0, 2, 3, 1))

    def detail_masks(self, config, images, enc: dict):
        """pure-grad's detail masks of the B images, as `maps` takes them: bool[B, R, R] at
        the vision input side R (images: RGB PIL images; enc: the processor's arrays)."""
        del enc
        return detail_masks(images, config.vision_config.image_size)

    def map_options(self, config, **options) -> dict[str, Any]:
        """Validated static options of `maps` (none by default)."""
        extra = {k: v for k, v in options.items() if v is not None}
        if extra:
            raise ValueError(f"{', '.join(extra)} do(es) not apply to {self.name} models")
        return {}

    def maps(self, module, params, enc: dict, pixels, detail, *, method: str,
             layers: tuple[int, ...], place, images, **options):  # fmt: skip
        """float32[B, N, N] maps of B images from their encoded [questions; general] prompts
        (enc: the processor's arrays, 2B rows), pixels float[B, H, W, C] and the pure-grad
        detail mask (or None); `place` puts a host array on the device(s); images: the B
        RGB images. A family whose map grid follows each image's size returns a list of B
        float32[h_i, w_i] maps instead."""
        raise NotImplementedError
