"""The model programs a real eval.run compiles, counted on a tiny random LLaVA.

  python -m bench.eval_programs --eval_flagfile eval/flags/textvqa_llava.flags --questions 60
  python -m bench.eval_programs --eval_flagfile eval/flags/vstar_llava.flags --questions 16

Writes a tiny random checkpoint (vicrop_jax.testing) and a benchmark in the flagfile's task
format (TextVQA's json, V*'s folders) whose questions follow the task's length spread in
words (bench.compile_time.TEXTVQA_WORDS; V*'s two question kinds, images 2100 x 1500: 2 x 2
tiles), then runs eval.runner.run with the flagfile's batch size and methods (and
--max_new_tokens, small for speed). Every XLA compile is recorded through jax.monitoring (the
function's name and seconds), and every call of the model programs (prompt_cache's passes,
the family's maps) that compiled, with its prompt length. The observed set of (pass, prompt
tokens) is compared with what bench.compile_time.eval_programs predicts from the same
questions' token counts: the prediction is what `bench.compile_time --eval_flagfile`
compiles at a full-size preset's shapes.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import tempfile
import time

import numpy as np
from absl import flags

from bench import compile_time


def _define_flags():
    flags.DEFINE_string("eval_flagfile", "eval/flags/textvqa_llava.flags", "an eval.run flagfile")
    flags.DEFINE_integer("questions", 60, "questions in the run")
    flags.DEFINE_integer("max_new_tokens", 3, "answer tokens (speed; no effect on the shapes)")
    flags.DEFINE_integer("seed", 0, "seed of the question lengths")
    flags.DEFINE_string("dir", None, "work directory (default: a temporary one)")
    flags.DEFINE_string("out", None, "write the result as JSON here")


VSTAR_SIZE = (2100, 1500)  # 2 x 2 tiles of the *_high variants


def _words(rng, n: int) -> str:
    from vicrop_jax.testing import WORDS

    return " ".join(rng.choice(WORDS[9:], size=n))


def write_benchmark(task: str, root: str, n: int, seed: int):
    """A benchmark of n questions in `task`'s published format (eval.datasets.DataSpec)."""
    from PIL import Image

    from eval.datasets import VSTAR_CATEGORIES, DataSpec

    rng = np.random.default_rng(seed)
    words = np.array(list(compile_time.TEXTVQA_WORDS))
    p = np.array(list(compile_time.TEXTVQA_WORDS.values()))
    if task == "textvqa":
        data = []
        os.makedirs(f"{root}/train_images", exist_ok=True)
        for i in range(n):
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3))).save(
                f"{root}/train_images/img{i}.jpg")  # fmt: skip
            q = _words(rng, int(rng.choice(words, p=p / p.sum())) - 1) + " ?"
            data.append({"question_id": i, "question": q, "image_id": f"img{i}",
                         "answers": ["red"] * 10})  # fmt: skip
        with open(f"{root}/val.json", "w") as f:
            json.dump({"data": data}, f)
        return DataSpec(textvqa_json=f"{root}/val.json", image_root=f"{root}/train_images")
    if task == "vstar":
        image = Image.new("RGB", VSTAR_SIZE, (90, 120, 150))
        for i in range(n):
            attribute = i % 2 == 0
            cat = VSTAR_CATEGORIES[0 if attribute else 1]
            os.makedirs(f"{root}/{cat}", exist_ok=True)
            image.save(f"{root}/{cat}/q{i}.jpg")
            k = 6 + int(rng.integers(1, 4)) if attribute else 11 + int(rng.integers(2, 7))
            options = ["red", "blue", "green", "white"][: 4 if attribute else 2]
            ann = {"target_object": ["cup"], "bbox": [[40, 30, 20, 10]],
                   "question": _words(rng, k - 1) + " ?", "options": options}  # fmt: skip
            with open(f"{root}/{cat}/q{i}.json", "w") as f:
                json.dump(ann, f)
        return DataSpec(vstar_dir=root)
    raise ValueError(f"no benchmark writer for task {task!r}")


class ProgramLog:
    """Every XLA compile (function name, seconds) and every model-program call that compiled,
    keyed as bench.compile_time.eval_programs keys them."""

    # module, attribute, name of the key, index of the prompt input among the positional args
    PROGRAMS = (
        ("vicrop_jax.prompt_cache", "start_pass", 4),
        ("vicrop_jax.prompt_cache", "answer_pass", 4),
        ("vicrop_jax.prompt_cache", "finish_pass", 4),
        ("vicrop_jax.families.llava", "llava_maps", 2),
    )

    def __init__(self):
        import importlib

        import jax

        self.compiles: list[tuple[str, float]] = []
        self.programs: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self._undo = []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        for mod_name, attr, index in self.PROGRAMS:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, attr)
            setattr(mod, attr, self._wrap(fn, attr, index))
            self._undo.append((mod, attr, fn))

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles.append((str(kwargs.get("fun_name")), duration))

    def _wrap(self, fn, name: str, index: int):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            before = len(self.compiles)
            out = fn(*args, **kwargs)
            key_name = f"{kwargs['method']}_map" if name == "llava_maps" else name
            key = (key_name, int(args[index].shape[1]))
            self.calls[key] += 1
            if any(name in f for f, _ in self.compiles[before:]):
                self.programs[key] += 1
            return out

        return wrapper

    def close(self) -> None:
        for mod, attr, fn in self._undo:
            setattr(mod, attr, fn)

    def by_function(self) -> dict[str, tuple[int, float]]:
        out: dict = collections.defaultdict(lambda: [0, 0.0])
        for f, s in self.compiles:
            out[f][0] += 1
            out[f][1] += s
        return {f: tuple(v) for f, v in sorted(out.items(), key=lambda kv: -kv[1][1])}


def predicted(model, plan, examples) -> dict:
    """bench.compile_time.eval_programs over the run's questions, token counts from the
    checkpoint's tokenizer, bucketed as the engine does (LENGTH_BUCKET, the shared-prompt
    tails too)."""
    from PIL import Image

    from eval.engine import LENGTH_BUCKET
    from vicrop_jax.bbox import high_res_tiles
    from vicrop_jax.families import family_of
    from vicrop_jax.processing import GENERAL_QUESTION

    family, tok, config = family_of(model), model.processor.tokenizer, model.config
    prefix = 1 + config.num_image_tokens
    tail = lambda q: family.prompt_tokens(tok, config, q, 1) - prefix  # noqa: E731
    questions = []
    for ex in examples:
        with Image.open(ex.image_file()) as im:
            tiles = len(high_res_tiles(im.size, family.high_res_threshold))
        short = ex.short_question if plan.short_maps and ex.short_question else ex.question
        questions.append(compile_time.Question(tail(ex.question), tail(short), tiles))
    return compile_time.eval_programs(
        plan, questions, image_tokens=config.num_image_tokens,
        general_tail=tail(GENERAL_QUESTION), tail_multiple=LENGTH_BUCKET,
        map_multiple=LENGTH_BUCKET,
    )  # fmt: skip


def main(argv):
    del argv
    import dataclasses

    import jax

    import vicrop_jax
    from eval.runner import Settings, run
    from vicrop_jax.testing import make_random_checkpoint

    f = flags.FLAGS
    jax.config.update("jax_enable_compilation_cache", False)
    plan = compile_time.eval_plan(f.eval_flagfile)
    plan = dataclasses.replace(plan, max_new_tokens=f.max_new_tokens)
    work = f.dir or tempfile.mkdtemp(prefix="eval_programs_")
    ckpt = make_random_checkpoint(os.path.join(work, "ckpt"))
    spec = write_benchmark(plan.task, os.path.join(work, "data"), f.questions, f.seed)
    model = vicrop_jax.load_model(ckpt)
    settings = Settings(model=ckpt, task=plan.task, methods=plan.methods, data=spec,
                        output_dir=os.path.join(work, f"run{time.time_ns()}"),
                        batch_size=plan.batch, max_new_tokens=plan.max_new_tokens,
                        layer=plan.layer, progress=False)  # fmt: skip
    log = ProgramLog()
    t0 = time.perf_counter()
    try:
        run(settings, model=model, log=lambda msg: None)
    finally:
        log.close()
    wall = time.perf_counter() - t0
    want = predicted(model, plan, settings.examples())
    got = dict(log.programs)
    compiled = {k for k, c in log.programs.items() if c}
    print(f"{f.eval_flagfile} on a tiny random LLaVA, {f.questions} questions, batch "
          f"{plan.batch}, methods {','.join(plan.methods)}: {wall:.1f} s, {len(log.compiles)} "
          f"XLA compiles ({sum(s for _, s in log.compiles):.1f} s)")  # fmt: skip
    print("\n| program (pass @ prompt tokens) | compiled | calls | predicted calls |")
    print("|---|---|---|---|")
    for key in sorted(set(log.calls) | set(want)):
        print(f"| {key[0]}@{key[1]} | {got.get(key, 0)} | {log.calls.get(key, 0)} | "
              f"{want.get(key, 0)} |")  # fmt: skip
    print("\n| compiled function | compiles | seconds |\n|---|---|---|")
    for name, (n, s) in log.by_function().items():
        print(f"| {name} | {n} | {s:.2f} |")
    same = compiled == set(want) and all(c == 1 for c in got.values())
    print(f"\nobserved model programs == predicted: {same}")
    if f.out:
        with open(f.out, "w") as fh:
            json.dump({"flagfile": f.eval_flagfile, "questions": f.questions, "plan":
                       dataclasses.asdict(plan), "wall_s": wall,
                       "compiled": {f"{k[0]}@{k[1]}": c for k, c in got.items()},
                       "calls": {f"{k[0]}@{k[1]}": c for k, c in log.calls.items()},
                       "predicted": {f"{k[0]}@{k[1]}": c for k, c in want.items()},
                       "functions": log.by_function(), "match": same}, fh, indent=2)  # fmt: skip
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    from eval import cli

    _define_flags()
    cli.run(main)
