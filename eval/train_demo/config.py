"""A run's settings: one frozen dataclass, whose fields are also the absl flags.

Each field carries its flag's help text in its metadata; `define_flags` generates the flags
from the fields, `from_flags` builds the record back from them, and `identity` (what a
workdir's settings.json holds, and what a resumed run must match) is every field not marked
operational. Operational fields say where a run writes and how often it logs or evaluates,
not what it trains.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from absl import flags

from eval import synthetic as syn

# The demo model's top-level param subtrees (vicrop_jax.models.llava; lm_head: untied).
PARAM_TREES = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")
# Every item prints one capital letter on each shape (eval.synthetic's "letter" glyphs).
GLYPHS = "letter"


def setting(default: Any, help: str, *, operational: bool = False, flag: bool = True,
            choices: tuple[str, ...] = ()) -> Any:  # fmt: skip
    """A config field: `help` is its flag's help text; an `operational` field stays out of
    the run's identity; `flag=False` keeps it off the command line (tests set it)."""
    meta = {"help": help, "operational": operational, "flag": flag, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The demo LLaVA's sizes (the HF config is derived in export.hf_config)."""

    image_size: int = setting(64, "Vision input side R (pixels).")
    patch_size: int = setting(8, "ViT patch side.")
    vision_hidden: int = setting(192, "ViT width.")
    vision_layers: int = setting(4, "ViT depth.")
    vision_heads: int = setting(6, "ViT heads.")
    vision_mlp: int = setting(768, "ViT MLP width.")
    text_hidden: int = setting(192, "Decoder width.")
    text_layers: int = setting(4, "Decoder depth.")
    text_heads: int = setting(4, "Decoder query heads.")
    text_kv_heads: int = setting(2, "Decoder key/value heads (GQA).")
    text_mlp: int = setting(512, "Decoder MLP width.")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


SMOKE_DIMS = ModelDims(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2,
                       vision_heads=2, vision_mlp=64, text_hidden=48, text_layers=2,
                       text_heads=4, text_kv_heads=2, text_mlp=96)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; the fields not marked operational fix a run's identity."""

    # Where the run writes, how often it reports.
    workdir: str = setting("/tmp/vicrop_train_demo", "Checkpoints and logs.", operational=True)
    export_dir: str = setting(
        "", "HF-format output directory, written after the last step ('': no export).",
        operational=True,
    )  # fmt: skip
    stop_at: int = setting(0, "Stop this run at this step (0: at --steps).", operational=True)
    log_every: int = setting(25, "Steps between train log records.", operational=True)
    eval_every: int = setting(500, "Steps between held-out evals (0: none).", operational=True)
    eval_items: int = setting(192, "Held-out items (split 'val').", operational=True)
    eval_sizes: tuple[int, ...] = setting(
        (), "Shorter sides of held-out images ([]: the generator's).", operational=True
    )
    checkpoint_every: int = setting(250, "Steps between checkpoints.", operational=True)
    eval_batch: int = setting(16, "Held-out items per batch.", operational=True, flag=False)
    progress: bool = setting(True, "Show a progress bar.", operational=True, flag=False)

    # The starting model.
    init_from: str = setting(
        "",
        "Model to fine-tune from: the workdir of a finished run (its latest checkpoint) or an "
        "exported HF directory (e.g. vicrop_jax/assets/demo; fresh patch heads).",
    )
    reinit: tuple[str, ...] = setting(
        (),
        "Top-level param subtrees of the --init_from model to initialise afresh (seeded), e.g. "
        "language_model: keep its vision tower and projector, start the decoder again.",
    )
    freeze: tuple[str, ...] = setting(
        (),
        "Top-level param subtrees to keep fixed (no update, no weight decay), e.g. "
        "vision_tower,multi_modal_projector: a decoder trained with attention losses then "
        "cannot reach its goal by reshaping the image features.",
    )
    dims: ModelDims = ModelDims()

    # Optimisation.
    seed: int = setting(0, "Seed of the init and of the training stream.")
    steps: int = setting(9000, "Optimizer steps (the schedule's length).")
    pretrain_steps: int = setting(0, "First steps: the vision tower alone on the patch-label loss.")
    pretrain_batch: int = setting(32, "Images per pretraining step.")
    batch_size: int = setting(8, "Items per step (each: 1 single + 1 pair row).")
    learning_rate: float = setting(1e-3, "Peak learning rate (AdamW).")
    warmup_steps: int = setting(200, "Linear warmup steps.")
    weight_decay: float = setting(0.05, "AdamW weight decay (matrices only).")
    grad_clip: float = setting(1.0, "Global gradient-norm clip.")

    # Loss weights (losses.py).
    patch_loss_weight: float = setting(
        0.0, "Weight of the patch-label loss on the image features (training-only heads)."
    )
    patch_label_cells: str = setting(
        "centre",
        "Patch labels on the cell at each glyph's and shape's centre, or on every cell whose "
        "centre lies inside that glyph's or shape's box.",
        choices=("centre", "all"),
    )
    attention_loss_weight: float = setting(
        0.0,
        "Weight of -log(share of the single-image answer query's image attention on the "
        "subject's cells) at the rel-att layer.",
    )
    general_loss_weight: float = setting(
        0.0,
        "Weight of KL(uniform || the general prompt's attention over the image) at the rel-att "
        "layer, so rel-att's ratio keeps the question's peak.",
    )
    ratio_peak_weight: float = setting(
        0.0,
        "Weight of a peak margin loss on rel-att's own map at the rel-att layer: log(question "
        "attention / general-prompt attention) over the image's cells, the subject's highest "
        "cell against the highest elsewhere.",
    )
    pair_attention_weight: float = setting(
        0.0,
        "Weight of -log(share of the [image, crop] prompt's answer attention, at the rel-att "
        "layer, on the subject's cells: in the image, and in the crop when it holds the glyph).",
    )

    # Question images and extra question rows (eval.synthetic options).
    min_subject_px: int = setting(20, "Smallest subject side (pixels).")
    max_aspect: float = setting(4 / 3, "Largest image aspect ratio.")
    distinct_colors: bool = setting(False, "Question images with every shape a different colour.")
    question_num_objects: tuple[int, int] | None = setting(
        None, "min,max shapes per question image ([]: the generator's, 2,5)."
    )
    question_rel_range: tuple[float, float] | None = setting(
        None,
        "min,max side of the question images' shapes / the image's shorter side ([]: the "
        "generator's, 0.03,0.5).",
    )
    contrast_questions: int = setting(
        0,
        "Extra single-image rows per item, each asking about another readable shape of the "
        "same image: the same pixels with different answers.",
    )
    pair_contrast_questions: int = setting(
        0,
        "1: an extra [image, crop] row per item asking about another shape whose glyph the crop "
        "shows (else another readable shape), so the model has to match the crop to the "
        "question.",
    )

    # The [image, crop] prompts' crops (data.training_item); the rest are subject crops.
    negative_fraction: float = setting(0.1, "Pairs whose crop misses the subject.")
    random_crop_fraction: float = setting(
        0.0, "Pairs whose crop is a random box (holding the subject or not)."
    )
    large_distractor_fraction: float = setting(
        0.0,
        "Pairs of items whose subject is in the large bucket whose crop shows another object "
        "(alike when possible): the original shows the subject's letter, so the model learns "
        "to answer from it rather than read the crop.",
    )
    large_partial_fraction: float = setting(
        0.0,
        "Pairs of items whose subject is in the large bucket whose crop is the search's size "
        "(the model's input side) on the subject's shape, holding under 80% of its letter.",
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: {getattr(self, f.name)!r}, use one of {choices}")
        if self.pair_contrast_questions not in (0, 1):
            raise ValueError(f"pair_contrast_questions: {self.pair_contrast_questions}, use 0 or 1")
        if self.reinit and not self.init_from:
            raise ValueError("reinit re-initialises parts of an --init_from model; set init_from")
        for name in ("reinit", "freeze"):
            unknown = set(getattr(self, name)) - set(PARAM_TREES)
            if unknown:
                raise ValueError(f"{name}: unknown {sorted(unknown)}; use some of {PARAM_TREES}")
        syn.SynthConfig(**self.synth_options())  # a bad generator option fails here, named
        total = self.negative_fraction + self.random_crop_fraction
        if total > 1 + 1e-9:
            raise ValueError(f"negative_fraction + random_crop_fraction = {total:g} > 1")
        total += self.large_distractor_fraction + self.large_partial_fraction
        if total > 1 + 1e-9:
            raise ValueError(
                "negative_fraction + random_crop_fraction + large_distractor_fraction + "
                f"large_partial_fraction = {total:g} > 1 on large subjects"
            )

    def synth_options(self) -> dict[str, Any]:
        """eval.synthetic options of the question images."""
        return {
            "glyphs": GLYPHS,
            "min_subject_px": self.min_subject_px,
            "max_aspect": self.max_aspect,
            "distinct_colors": self.distinct_colors,
            **({"num_objects": self.question_num_objects} if self.question_num_objects else {}),
            **({"rel_range": self.question_rel_range} if self.question_rel_range else {}),
        }

    def pretrain_options(self) -> dict[str, Any]:
        """Pretraining images: small (fast to render), crowded, every glyph readable."""
        return {**self.synth_options(), "num_objects": (6, 10), "rel_range": (0.1, 0.45),
                "sizes": (224, 256), "min_subject_px": 12, "distinct_colors": False}  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """Every field not marked operational, as JSON values (settings.json)."""
        return identity(self)


@dataclasses.dataclass(frozen=True)
class Actions:
    """What the entry point does instead of (or before) training; never part of a run."""

    smoke: bool = setting(
        False, "A few steps on a tiny model, to check the script.", operational=True
    )
    export_only: bool = setting(
        False, "Export the latest checkpoint to --export_dir and exit.", operational=True
    )
    probe_items: int = setting(
        0,
        "If > 0: print how well the latest checkpoint's image features name each object "
        "(patch heads, by size bucket) on this many demo questions, and exit.",
        operational=True,
    )
    probe_questions: int = setting(
        0,
        "If > 0: on the demo questions among the first N whose image holds >= 2 large shapes, "
        "ask the latest checkpoint about each of those shapes (no crop) and print the accuracy "
        "and the share of images where every question got one answer; then exit.",
        operational=True,
    )


def smoke(cfg: TrainConfig) -> TrainConfig:
    """`cfg` cut to a few steps of a tiny model, to check the script end to end."""
    return dataclasses.replace(cfg, dims=SMOKE_DIMS, steps=4 + min(cfg.pretrain_steps, 2),
                               pretrain_steps=min(cfg.pretrain_steps, 2), pretrain_batch=4,
                               batch_size=2, warmup_steps=1, log_every=2, eval_every=4,
                               eval_items=4, eval_batch=4, checkpoint_every=2)  # fmt: skip


def identity(cfg) -> dict[str, Any]:
    """The non-operational fields of a config dataclass (nested ones as dicts), as JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("operational"):
            value = getattr(cfg, f.name)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(out))


# ---------------------------------------------------------------------------------------
# Flags from the fields.


def flag_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of each flag of a config dataclass; a nested dataclass's fields are
    flags of their own names (--image_size, not --dims.image_size)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += flag_fields(kind)
        elif f.metadata.get("flag", True):
            out.append((f, kind))
    return out


def _sequence(kind) -> tuple[Any, int | None, bool] | None:
    """(element type, fixed length or None, optional) of a tuple type, else None."""
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
    if typing.get_origin(kind) is not tuple:
        return None
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        return args[0], None, optional
    return args[0], len(args), optional


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines an absl flag per field of config dataclass `cls` (its default, its help)."""
    for f, kind in flag_fields(cls):
        name, default, text = f.name, f.default, f.metadata["help"]
        if kind is bool:
            flags.DEFINE_bool(name, default, text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(name, default, text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(name, default, text, flag_values=flag_values)
        elif kind is str and f.metadata.get("choices"):
            flags.DEFINE_enum(name, default, f.metadata["choices"], text, flag_values=flag_values)
        elif kind is str:
            flags.DEFINE_string(name, default, text, flag_values=flag_values)
        elif _sequence(kind):
            values = [str(v) for v in default or ()]
            flags.DEFINE_list(name, values, text, flag_values=flag_values)
            length = _sequence(kind)[1]
            if length is not None:  # a fixed-length tuple: that many values, or none
                flags.register_validator(
                    name, lambda v, n=length: not v or len(v) == n,
                    f"--{name} takes {length} comma-separated values", flag_values=flag_values,
                )  # fmt: skip
        else:
            raise TypeError(f"{cls.__name__}.{name}: no flag for type {kind}")


def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS):
    """An instance of config dataclass `cls` from the parsed flags `define_flags` made."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = from_flags(kind, flag_values)
        elif f.metadata.get("flag", True):
            kwargs[f.name] = _flag_value(kind, flag_values[f.name].value)
    return cls(**kwargs)


def _flag_value(kind, value):
    """A list flag's strings as the field's tuple (None for an unset optional one)."""
    sequence = _sequence(kind)
    if sequence is None:
        return value
    element, _, optional = sequence
    if optional and not value:
        return None
    return tuple(element(v) for v in value)
