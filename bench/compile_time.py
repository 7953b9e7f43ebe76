"""XLA compile time of every pass a ViCrop question runs, at a full-size preset's shapes.

  python -m bench.compile_time --preset llava-1.5-7b          # bf16, batch 1
  python -m bench.compile_time --preset llava-1.5-13b --out r.json

Lowers and compiles each jitted pass for the default backend with abstract parameters
(jax.ShapeDtypeStruct: no weights, as bench.memory does) and reports, per pass, the seconds
to trace and lower it to StableHLO and the seconds XLA takes to compile that (the first
call's wait before any computation):
  * rel-att, shared prefix (vicrop_jax.prompt_cache): start_pass (the prefix and the
    [question; general] tails, the map, the baseline answer) and finish_pass (the crop's
    vision tower, the [original, crop] tail, its answer): the two passes of one rel-att
    question; their sum is checked against --bar_s;
  * answer_pass (the baseline answer without a map: grad-att and pure-grad questions), the
    grad-att and pure-grad map passes (vicrop_jax.families.llava.llava_maps), the unshared
    rel-att map pass, and the plain greedy generate (one image, vicrop_jax.generate).
Prompt lengths follow the hub tokenizer's: the question prompt's text after the image is
about 30 tokens, bucketed to --text_tokens. JAX's persistent compilation cache is off for
the run, so every figure is a fresh compile.

A whole eval run (its total is checked against --eval_bar_s, 3 minutes):

  python -m bench.compile_time --preset llava-1.5-7b,llava-1.5-13b \
      --eval_flagfile eval/flags/textvqa_llava.flags [--questions 5000]

compiles every distinct program that `python -m eval.run --flagfile=FLAGFILE` compiles on one
device, at the preset's shapes: the flagfile gives the batch size, the methods (*_high and
--high_res), the task and --layer; `eval_programs` batches the run's questions as eval.runner,
eval.engine and vicrop_jax.pipeline do (full batches, the last one padded; one
shared-prompt pass per batch for the baseline answers, with rel_att's map where it is asked
with the answered question; each other map method's pass over its images or *_high tiles; one
crop pass per method) and keys each call by its pass and its bucketed prompt length. The
bucket multiples are the engine's (eval.engine.LENGTH_BUCKET; --tail_bucket and --map_bucket
override them). The hub tokenizer is not at hand, so the questions' lengths are estimated
(TEMPLATE_TOKENS and the rest below; TextVQA 3-20 words, mean 7.2; V*'s two question kinds
with their options): the set of programs depends on the shortest and longest batches, i.e.
the ends of that spread. `python -m bench.eval_programs` runs eval.run on a tiny random
LLaVA and checks that the programs it compiles are the ones `eval_programs` predicts from
the same questions. Not counted: the small programs that do not grow with the model (the box
search, pure-grad's detail mask, RoPE tables and other eager ops; about 10 s on the tiny
run). Each program's wall seconds and the process's CPU seconds (all its threads) are
reported; the bar is checked on CPU seconds, which a busy machine does not stretch: on an idle
one the wall time is at most that (the compile runs on one main thread and a few helpers).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags


def _define_flags():
    """The command line's flags (defined when run as a program, so that modules importing
    this one keep their own)."""
    flags.DEFINE_list("preset", ["llava-1.5-7b"], "vicrop_jax.models.llava.PRESETS names")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "weights and cache")
    flags.DEFINE_integer("batch", 1, "questions per pass")
    flags.DEFINE_integer("text_tokens", 32, "a prompt's text tokens after the first image")
    flags.DEFINE_integer("max_new_tokens", 20, "answer tokens (official: 20)")
    flags.DEFINE_float("bar_s", 60.0, "rel-att's passes (start + finish) must compile within")
    flags.DEFINE_list("passes", [], "only these passes (default: all)")
    flags.DEFINE_integer(
        "repeat", 1, "compile each pass this many times afresh and keep the fastest (the machine's "
        "other work only ever adds time)",
    )  # fmt: skip
    flags.DEFINE_string("out", None, "write the results as JSON here")
    flags.DEFINE_string(
        "eval_flagfile", None, "compile the distinct programs of a whole eval.run with this "
        "flagfile's settings (batch size, methods, task, layer) at the preset's shapes, in "
        "place of one question's passes",
    )  # fmt: skip
    flags.DEFINE_integer("questions", 0, "--eval_flagfile: questions in the run (0: the "
                         "task's published count)")  # fmt: skip
    flags.DEFINE_integer("seed", 0, "--eval_flagfile: seed of the question length spread")
    flags.DEFINE_integer("text_layers", None, "LM layers (default the preset's): compile time "
                         "against depth")  # fmt: skip
    flags.DEFINE_integer("vision_layers", None, "vision tower layers (default the preset's)")
    flags.DEFINE_integer("tail_bucket", None, "--eval_flagfile: bucket multiple of the "
                         "shared-prompt tails (default the engine's LENGTH_BUCKET)")  # fmt: skip
    flags.DEFINE_integer("map_bucket", None, "--eval_flagfile: bucket multiple of the map "
                         "prompts (default the engine's LENGTH_BUCKET)")  # fmt: skip
    flags.DEFINE_float("eval_bar_s", 180.0, "--eval_flagfile: the run's programs must compile "
                       "within")  # fmt: skip


REL_ATT_PASSES = ("start_pass", "finish_pass")
PAD_ID = 32001


def pass_lowerings(config, batch: int, dtype, *, text_tokens: int, max_new_tokens: int) -> dict:
    """{pass name: () -> jax.stages.Lowered} for abstract params of `config`."""
    from vicrop_jax import prompt_cache
    from vicrop_jax.families import family_of
    from vicrop_jax.families.llava import llava_maps
    from vicrop_jax.generate import greedy_generate, init_cache
    from vicrop_jax.loading import module_for
    from vicrop_jax.models.llava import abstract_params

    module = module_for(config)
    params = abstract_params(config, dtype)
    s = jax.ShapeDtypeStruct
    v = config.vision_config
    t = config.num_image_tokens
    p = 1 + t  # BOS and the first image: the shared prefix
    bucket = lambda n: -(-n // 8) * 8  # noqa: E731
    l1 = bucket(text_tokens)
    l2 = bucket(t + text_tokens)  # the crop's tokens, then the text
    full = bucket(p + text_tokens)  # an unshared one-image prompt
    pixels = s((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = lambda rows, n: s((rows, n), jnp.int32)  # noqa: E731
    layers = family_of(config).layers(config)
    common = dict(max_new_tokens=max_new_tokens, eos_ids=(2,), pad_id=PAD_ID)
    cache = jax.eval_shape(lambda: init_cache(config, batch, p, dtype))
    prefix = s((p,), jnp.int32)

    def maps(method):
        detail = s((batch, v.image_size, v.image_size), bool) if method == "pure_grad" else None
        return lambda: llava_maps.lower(
            module, params, ids(2 * batch, full), ids(2 * batch, full), pixels, detail,
            method=method, layers=() if method == "pure_grad" else layers,
        )  # fmt: skip

    return {
        "start_pass": lambda: prompt_cache.start_pass.lower(
            module, params, prefix, pixels, ids(2 * batch, l1), ids(2 * batch, l1),
            layers=layers, image_start=1, **common,
        ),
        "finish_pass": lambda: prompt_cache.finish_pass.lower(
            module, params, cache, pixels, ids(batch, l2), ids(batch, l2), **common
        ),
        "answer_pass": lambda: prompt_cache.answer_pass.lower(
            module, params, prefix, pixels, ids(batch, l1), ids(batch, l1), **common
        ),
        "grad_att_map": maps("grad_att"),
        "pure_grad_map": maps("pure_grad"),
        "rel_att_map_unshared": maps("rel_att"),
        "greedy_generate": lambda: greedy_generate.lower(
            module, params, ids(batch, full), pixels, ids(batch, full), **common
        ),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# A whole eval run's programs (--eval_flagfile).

# Prompt lengths in LLaMA SentencePiece tokens at real size, estimated (the hub tokenizer is not
# at hand): the LLaVA template's text after the image, "\nUSER: " and " Answer the question
# using a single word or phrase.\nASSISTANT:", is 19 tokens; GENERAL_QUESTION 8; a question
# of w words round(1.2 w) + 1 (the "?"; names, numbers and OCR words split into pieces).
TEMPLATE_TOKENS = 19
GENERAL_TOKENS = 8
# V*'s answered question adds its options, one "(A) red" line each (about 6 tokens with the
# newline), and VSTAR_INSTRUCTION (14).
OPTION_TOKENS, INSTRUCTION_TOKENS = 6, 14
# TextVQA val question lengths in words: 3-20, mean 7.2 (the dataset's published mean); the
# shape of the spread is assumed. The programs of a run depend mostly on its shortest and
# longest batches, i.e. on the spread's ends.
TEXTVQA_WORDS = {3: 3, 4: 8, 5: 14, 6: 16, 7: 15, 8: 12, 9: 9, 10: 7, 11: 5, 12: 3.5, 13: 2.5,
                 14: 1.5, 15: 1.0, 16: 0.7, 17: 0.5, 18: 0.4, 19: 0.3, 20: 0.2}  # fmt: skip
# Published question counts (TextVQA val, V* Bench).
TASK_QUESTIONS = {"textvqa": 5000, "vstar": 191}
# V* Bench: 115 direct_attributes questions ("What is the color of the {object}?", 4
# options) and 76 relative_position ones ("Is the {a} on the left or right side of the
# {b}?", 2 options); images 2246 x 1582 on average: 2 x 2 tiles of the *_high variants.
VSTAR_TILES = 4


@dataclasses.dataclass(frozen=True)
class Question:
    """One question's prompt lengths in tokens after the shared prefix (BOS and the first
    image): the answered question's (tail) and the map's (map_tail, V*'s short question),
    and the tiles of its image in the *_high variants."""

    tail: int
    map_tail: int
    tiles: int = 1


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """The settings of an eval run that decide its programs (one device: the LLaVA prompts
    share their prefix)."""

    task: str
    batch: int
    methods: tuple[str, ...]  # as eval.engine.parse_methods returns them
    max_new_tokens: int = 20
    layer: str | None = None
    short_maps: bool = False  # maps asked with another question than the answered one


def read_flagfile(path: str) -> dict[str, str]:
    """{flag: value} of an absl flagfile ("--name=value" lines, "#" comments, --flagfile=
    lines read in place; a later line wins); "--name" alone is "true", "--noname" "false"."""
    out: dict[str, str] = {}
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("--"):
                raise ValueError(f"{path}: not a flag line: {line!r}")
            name, eq, value = line[2:].partition("=")
            if name == "flagfile":
                out.update(read_flagfile(value))
            elif eq:
                out[name] = value
            elif name.startswith("no"):
                out[name[2:]] = "false"
            else:
                out[name] = "true"
    return out


def eval_plan(path: str) -> EvalPlan:
    """The EvalPlan of an eval.run flagfile (eval.run's defaults where it sets nothing)."""
    from eval.engine import parse_methods

    f = read_flagfile(path)
    task = f.get("task")
    if task not in TASK_QUESTIONS:
        raise ValueError(f"{path}: --task={task}: the spread of question lengths is known for "
                         f"{', '.join(TASK_QUESTIONS)}")  # fmt: skip
    high = f.get("high_res", "false").lower() in ("true", "1")
    return EvalPlan(
        task=task, batch=int(f.get("batch_size", 8)),
        methods=parse_methods(f.get("methods", "rel_att"), high_res=high),
        max_new_tokens=int(f.get("max_new_tokens", 20)), layer=f.get("layer"),
        # --map_question=auto asks V*'s maps with its short question.
        short_maps=task == "vstar" and f.get("map_question", "auto") == "auto",
    )  # fmt: skip


def question_spread(task: str, n: int, seed: int = 0) -> list[Question]:
    """n questions of `task` with the estimated real-size lengths above, in a seeded order."""
    rng = np.random.default_rng(seed)
    tokens = lambda words: round(1.2 * words) + 1  # noqa: E731
    if task == "textvqa":
        words = np.array(list(TEXTVQA_WORDS))
        p = np.array(list(TEXTVQA_WORDS.values()))
        drawn = rng.choice(words, size=n, p=p / p.sum())
        return [Question(TEMPLATE_TOKENS + tokens(w), TEMPLATE_TOKENS + tokens(w)) for w in drawn]
    if task == "vstar":
        out = []
        for i in range(n):
            attribute = i < round(n * 115 / 191)
            words = 6 + int(rng.integers(1, 4)) if attribute else 11 + int(rng.integers(2, 7))
            options = 4 if attribute else 2
            short = TEMPLATE_TOKENS + tokens(words)
            full = short + options * OPTION_TOKENS + INSTRUCTION_TOKENS
            out.append(Question(full, short, VSTAR_TILES))
        return [out[i] for i in rng.permutation(n)]
    raise ValueError(f"no length spread for task {task!r}")


def eval_programs(plan: EvalPlan, questions: list[Question], *, image_tokens: int,
                  general_tail: int, tail_multiple: int, map_multiple: int) -> dict:  # fmt: skip
    """{(pass, length): calls} of the model programs an eval run compiles, as eval.runner,
    eval.engine and vicrop_jax.pipeline batch it on one device: batches of plan.batch
    questions (the last padded by repeating its last question), one shared-prefix pass for
    the baseline answers (start_pass with rel_att's map when rel_att is asked with the
    answered question, else answer_pass) over the [question; general] tails bucketed to
    tail_multiple, each map method's map over its images (or *_high tiles) in full batches of
    plan.batch at the [question; general] prompt length bucketed to map_multiple, and one
    finish_pass per method for each batch's crops ([original, crop] tails). `length` is the
    token axis of the program's prompt input; a program is compiled once per distinct key.

    Args:
      plan: the run's settings.
      questions: the run's questions in order.
      image_tokens: T, the image tokens of one image; the shared prefix is 1 + T.
      general_tail: the general prompt's tokens after the prefix.
      tail_multiple, map_multiple: the bucket multiples of the shared-prefix tails
        (vicrop_jax.prompt_cache) and of the map prompts (eval.engine.LENGTH_BUCKET).
    """
    from vicrop_jax.pipeline import split_method

    bucket = lambda n, m: -(-n // m) * m  # noqa: E731
    prefix = 1 + image_tokens
    with_map = "rel_att" in plan.methods and not plan.short_maps
    maps = [m for m in plan.methods if split_method(m)[0] in ("rel_att", "grad_att", "pure_grad")
            and not (m == "rel_att" and with_map)]  # fmt: skip
    out: dict = collections.Counter()
    b = plan.batch
    for start in range(0, len(questions), b):
        batch = questions[start : start + b]
        tail = max(q.tail for q in batch)
        out["start_pass" if with_map else "answer_pass", bucket(max(tail, general_tail),
                                                                tail_multiple)] += 1  # fmt: skip
        for method in maps:
            base, high = split_method(method)
            items = [q.map_tail for q in batch for _ in range(q.tiles if high else 1)]
            for i in range(0, len(items), b):
                n = prefix + max(max(items[i : i + b]), general_tail)
                out[f"{base}_map", bucket(n, map_multiple)] += 1
        # One call a method: its crops' answers (a batch without any box skips it).
        out["finish_pass", bucket(image_tokens + tail, tail_multiple)] += len(plan.methods)
    return dict(out)


def program_lowering(config, batch: int, dtype, key: tuple[str, int], *, max_new_tokens: int,
                     layers: tuple[int, ...]):  # fmt: skip
    """() -> jax.stages.Lowered of one eval_programs key at abstract params of `config`."""
    from vicrop_jax import prompt_cache
    from vicrop_jax.families.llava import llava_maps
    from vicrop_jax.generate import init_cache
    from vicrop_jax.loading import module_for
    from vicrop_jax.models.llava import abstract_params

    name, length = key
    module, params = module_for(config), abstract_params(config, dtype)
    s, v = jax.ShapeDtypeStruct, config.vision_config
    p = 1 + config.num_image_tokens
    pixels = s((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = lambda rows: s((rows, length), jnp.int32)  # noqa: E731
    common = dict(max_new_tokens=max_new_tokens, eos_ids=(2,), pad_id=PAD_ID)
    prefix = s((p,), jnp.int32)
    if name == "start_pass":
        return lambda: prompt_cache.start_pass.lower(
            module, params, prefix, pixels, ids(2 * batch), ids(2 * batch), layers=layers,
            image_start=1, **common,
        )  # fmt: skip
    if name == "answer_pass":
        return lambda: prompt_cache.answer_pass.lower(
            module, params, prefix, pixels, ids(batch), ids(batch), **common
        )
    if name == "finish_pass":
        cache = jax.eval_shape(lambda: init_cache(config, batch, p, dtype))
        return lambda: prompt_cache.finish_pass.lower(
            module, params, cache, pixels, ids(batch), ids(batch), **common
        )
    method = name.removesuffix("_map")
    detail = s((batch, v.image_size, v.image_size), bool) if method == "pure_grad" else None
    return lambda: llava_maps.lower(
        module, params, ids(2 * batch), ids(2 * batch), pixels, detail, method=method,
        layers=() if method == "pure_grad" else layers,
    )  # fmt: skip


def eval_run_programs(
    config,
    plan: EvalPlan,
    n_questions: int,
    seed: int = 0,
    *,
    tail_multiple: int | None = None,
    map_multiple: int | None = None,
) -> dict:
    """eval_programs of `plan` over n_questions of the task's estimated spread at `config`'s
    shapes; the bucket multiples default to the engine's (eval.engine.LENGTH_BUCKET, which
    its Executor passes to the shared-prompt tails too)."""
    from eval.engine import LENGTH_BUCKET

    questions = question_spread(plan.task, n_questions or TASK_QUESTIONS[plan.task], seed)
    return eval_programs(plan, questions, image_tokens=config.num_image_tokens,
                         general_tail=TEMPLATE_TOKENS + GENERAL_TOKENS,
                         tail_multiple=tail_multiple or LENGTH_BUCKET,
                         map_multiple=map_multiple or LENGTH_BUCKET)  # fmt: skip


def compile_programs(config, batch: int, dtype, keys, *, max_new_tokens: int,
                     layers: tuple[int, ...]) -> dict:  # fmt: skip
    """{"pass@length": {"lower_s", "compile_s", "total_s", "cpu_s"}} of each key, compiled
    afresh: wall seconds, and the process's CPU seconds of the whole (all threads: at least
    the wall time on an idle machine; a busy one stretches the wall time only)."""
    out = {}
    for key in keys:
        lower = program_lowering(config, batch, dtype, key, max_new_tokens=max_new_tokens,
                                 layers=layers)  # fmt: skip
        jax.clear_caches()
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = lower()
        t1 = time.perf_counter()
        lowered.compile()
        t2, c2 = time.perf_counter(), time.process_time()
        name = f"{key[0]}@{key[1]}"
        out[name] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
                     "cpu_s": c2 - c0}  # fmt: skip
        print(f"  {name}: lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s (wall); "
              f"{c2 - c0:.1f} CPU s", flush=True)  # fmt: skip
    return out


def eval_table(results: dict, calls: dict, bar: float) -> str:
    """The per-program table of --eval_flagfile runs and each preset's total against bar
    (checked on CPU seconds, which load does not stretch)."""
    lines = [
        "| preset | program (pass @ prompt tokens) | calls | trace + lower s | XLA compile s | "
        "total s | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for preset, programs in results.items():
        for name, r in programs.items():
            cells = (r["lower_s"], r["compile_s"], r["total_s"], r["cpu_s"])
            lines.append(f"| {preset} | {name} | {calls[preset][name]} | "
                         + " | ".join(f"{c:.1f}" for c in cells) + " |")  # fmt: skip
        total = sum(r["total_s"] for r in programs.values())
        xla = sum(r["compile_s"] for r in programs.values())
        cpu = sum(r["cpu_s"] for r in programs.values())
        verdict = "within" if cpu <= bar else f"**over** by {cpu - bar:.0f} s,"
        lines.append(f"| {preset} | {len(programs)} programs | | | {xla:.1f} | {total:.1f} | "
                     f"{cpu:.1f} ({verdict} {bar:g} s) |")  # fmt: skip
    return "\n".join(lines)


def compile_times(config, batch: int, dtype, *, text_tokens: int, max_new_tokens: int,
                  passes=(), repeat: int = 1) -> dict:  # fmt: skip
    """{pass: {"lower_s", "compile_s", "total_s"}}, each pass traced, lowered and compiled
    afresh (JAX's in-memory caches cleared first), the fastest of `repeat` tries."""
    out = {}
    todo = pass_lowerings(config, batch, dtype, text_tokens=text_tokens,
                          max_new_tokens=max_new_tokens)  # fmt: skip
    for _ in range(repeat):
        for name, lower in todo.items():
            if passes and name not in passes:
                continue
            jax.clear_caches()
            t0 = time.perf_counter()
            lowered = lower()
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            r = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
            print(f"  {name}: lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s", flush=True)
            if name not in out or r["total_s"] < out[name]["total_s"]:
                out[name] = r
    return out


def table(results: dict, bar: float) -> str:
    lines = [
        "| preset | pass | trace + lower s | XLA compile s | total s |",
        "|---|---|---|---|---|",
    ]
    for preset, passes in results.items():
        for name, r in passes.items():
            lines.append(f"| {preset} | {name} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
                         f"{r['total_s']:.1f} |")  # fmt: skip
        if all(n in passes for n in REL_ATT_PASSES):
            rel = sum(passes[n]["total_s"] for n in REL_ATT_PASSES)
            xla = sum(passes[n]["compile_s"] for n in REL_ATT_PASSES)
            verdict = "within" if rel <= bar else "**over**"
            lines.append(f"| {preset} | rel-att (start + finish) | | {xla:.1f} | {rel:.1f} "
                         f"({verdict} {bar:g} s) |")  # fmt: skip
        every = sum(r["total_s"] for r in passes.values())
        lines.append(f"| {preset} | every pass above | | | {every:.1f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    import platform
    import resource

    from vicrop_jax.models.llava import LlavaConfig
    from vicrop_jax.testing import preset_config_dict

    f = flags.FLAGS
    jax.config.update("jax_enable_compilation_cache", False)
    load_before = os.getloadavg()[0]
    dtype = jnp.bfloat16 if f.dtype == "bfloat16" else jnp.float32
    if f.eval_flagfile:
        return eval_main(f, dtype, load_before)
    results = {}
    for preset in f.preset:
        print(f"{preset}:", flush=True)
        config = LlavaConfig.from_dict(preset_config_dict(
            preset, 32000, text_layers=f.text_layers, vision_layers=f.vision_layers))  # fmt: skip
        results[preset] = compile_times(
            config, f.batch, dtype, text_tokens=f.text_tokens,
            max_new_tokens=f.max_new_tokens, passes=tuple(f.passes), repeat=f.repeat,
        )  # fmt: skip
    device = jax.devices()[0]
    load = (load_before, os.getloadavg()[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cpu = platform.processor() or platform.machine()
    print(f"\n# XLA compile time (fastest of {f.repeat}): {f.dtype}, batch "
          f"{f.batch}, text {f.text_tokens} tokens, {f.max_new_tokens} answer tokens; backend "
          f"{device.platform} ({cpu}, {os.cpu_count()} CPUs, 1-min load average {load[0]:.1f} "
          f"before, {load[1]:.1f} after); peak RSS {peak:.2f} GiB\n")  # fmt: skip
    print(table(results, f.bar_s))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"dtype": f.dtype, "batch": f.batch, "repeat": f.repeat,
                       "text_tokens": f.text_tokens, "max_new_tokens": f.max_new_tokens,
                       "peak_rss_gib": peak, "load_average": load, "results": results},
                      fh, indent=2)  # fmt: skip


def eval_main(f, dtype, load_before: float) -> None:
    """--eval_flagfile: compile every distinct program of the run, per preset."""
    import platform
    import resource

    from eval.runner import parse_layer
    from vicrop_jax.families import family_of
    from vicrop_jax.models.llava import LlavaConfig
    from vicrop_jax.testing import preset_config_dict

    plan = eval_plan(f.eval_flagfile)
    n = f.questions or TASK_QUESTIONS[plan.task]
    print(f"{f.eval_flagfile}: {plan}; {n} questions", flush=True)
    results, calls = {}, {}
    for preset in f.preset:
        config = LlavaConfig.from_dict(preset_config_dict(
            preset, 32000, text_layers=f.text_layers, vision_layers=f.vision_layers))  # fmt: skip
        layers = family_of(config).layers(config, parse_layer(plan.layer))
        programs = eval_run_programs(config, plan, n, f.seed, tail_multiple=f.tail_bucket,
                                     map_multiple=f.map_bucket)  # fmt: skip
        print(f"{preset}: {len(programs)} programs", flush=True)
        results[preset] = compile_programs(config, plan.batch, dtype, sorted(programs),
                                           max_new_tokens=plan.max_new_tokens,
                                           layers=layers)  # fmt: skip
        calls[preset] = {f"{k[0]}@{k[1]}": c for k, c in programs.items()}
    load = (load_before, os.getloadavg()[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cpu = platform.processor() or platform.machine()
    print(f"\n# XLA compile time of a whole eval run's programs: {f.eval_flagfile}, {n} "
          f"questions, {f.dtype}, batch {plan.batch}, {plan.max_new_tokens} answer tokens; "
          f"backend {jax.devices()[0].platform} ({cpu}, {os.cpu_count()} CPUs, 1-min load "
          f"average {load[0]:.1f} before, {load[1]:.1f} after); peak RSS {peak:.2f} "
          "GiB\n")  # fmt: skip
    print(eval_table(results, calls, f.eval_bar_s))
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"eval_flagfile": f.eval_flagfile, "plan": dataclasses.asdict(plan),
                       "questions": n, "seed": f.seed, "dtype": f.dtype, "peak_rss_gib": peak,
                       "load_average": load, "calls": calls, "results": results},
                      fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    from eval import cli  # --help exits 0

    _define_flags()
    cli.run(main)
