"""Analyses behind the method: attention ratio per layer (paper Figure 3) and a layer sweep.

python -m eval.analysis --flagfile=eval/flags/textvqa_llava.flags --analysis=attention_ratio
python -m eval.analysis --flagfile=... --analysis=layer_sweep --sweep_layers=10,12,14,16
python -m eval.analysis --flagfile=eval/flags/demo.flags --analysis=crop_contents

Takes the same flags as eval.run (model, task, data, batch size, ...) and writes
analysis_<kind>.json and .md into --output_dir.

Attention ratio: for each question with a ground-truth box, the last input position's
attention over the image tokens (heads averaged) at every LM layer, on the N x N patch grid,
summed inside the box's cells, divided by the mean of the same sum over every same-size
window of the grid. Above 1 means the layer attends to the box more than to a random region
of its size. As in the box search, the map is taken to span the whole image.

Layer sweep: the questions are split by a hash of their id into a held-out part and a test
part; each candidate layer's crop accuracy is measured on the held-out part, the best layer
(first on ties) is chosen there, and its accuracy, with the no-crop baseline, is reported on
the test part only.

Crop contents (synthetic task; reads the finished eval.run records in --output_dir and the
benchmark's data.json, no model): for each method and size bucket, the crops split by what
they hold: the subject's printed text (>= 80% of its box inside the crop), another
object's text and not the subject's, or neither; per group the crop accuracy, the no-crop
accuracy on the same questions, and how many crop answers are that other object's text.
A method that loses to no crop on a bucket shows here whether its boxes miss the subject or
the model reads whatever the crop shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from eval import report
from eval.engine import Engine, Item, box_cells, coverage
from vicrop_jax.families import family_of
from vicrop_jax.loading import Model, forward
from vicrop_jax.maps import image_rows
from vicrop_jax.processing import encode


def layer_maps(model: Model, images, questions: Sequence[str]) -> np.ndarray:
    """Heads-averaged last-position attention over the image, per layer: float32[B, L, N, N]
    (families whose image tokens are patches, as LLaVA's)."""
    family = family_of(model)
    cfg = model.config
    try:  # a family whose image tokens are not one fixed patch grid refuses before any pass
        family.grid_map(cfg, jnp.zeros((1, family.map_grid(cfg) ** 2)))
    except NotImplementedError as e:
        raise ValueError(f"attention_ratio needs image tokens on a fixed patch grid: {e}") from None
    enc = encode(model.processor, [family.prompt(q) for q in questions], list(images))
    out = forward(model, enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    rows = image_rows(
        out.attentions, jnp.asarray(enc["input_ids"]), cfg.image_token_index, cfg.num_image_tokens
    )  # [B, L, T]
    b, nl = rows.shape[:2]
    maps = family.grid_map(cfg, rows.reshape(b * nl, -1))
    return np.asarray(maps, np.float32).reshape(b, nl, *maps.shape[1:])


def window_ratio(att: np.ndarray, cells: Sequence[int]) -> float:
    """Attention in a window / mean attention over every same-size window of the map."""
    c1, r1, c2, r2 = cells
    h, w = r2 - r1, c2 - c1
    table = np.pad(np.cumsum(np.cumsum(np.asarray(att, np.float64), 0), 1), ((1, 0), (1, 0)))
    sums = table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]  # every window
    mean = sums.mean()
    inside = table[r2, c2] - table[r1, c2] - table[r2, c1] + table[r1, c1]
    return float(inside / mean) if mean > 0 else float("nan")


def attention_ratios(model: Model, items: Sequence[Item], batch_size: int = 8) -> np.ndarray:
    """Attention ratio per question and layer, float64[n, L] (items need a gt_bbox)."""
    grid = model.config.vision_config.grid
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        qs = [it.example.short_question or it.example.question for it in batch]
        maps = layer_maps(model, [it.image for it in batch], qs)
        for it, per_layer in zip(batch, maps, strict=True):
            cells = box_cells(it.example.gt_bbox, it.image.size, grid)
            out.append([window_ratio(m, cells) for m in per_layer])
    return np.asarray(out, np.float64)


def ratio_summary(ratios: np.ndarray) -> dict:
    """Per layer: mean, median and share of questions above 1."""
    return {
        "questions": int(ratios.shape[0]),
        "mean": np.nanmean(ratios, 0).tolist(),
        "median": np.nanmedian(ratios, 0).tolist(),
        "above_1": np.nanmean(ratios > 1, 0).tolist(),
    }


def held_out(example_id: str, fraction: float) -> bool:
    """Stable split: an id goes to the held-out part with probability `fraction`."""
    h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _accuracy(task: str, items, results, field: str, method: str) -> float | None:
    if not items:
        return None
    scores = []
    for it, res in zip(items, results, strict=True):
        if field == "no_crop":
            pred = res["original_answer"]
        else:
            pred = res["methods"][method]["crop_answer"]
        rec = {"question": it.example.question, "labels": it.example.labels}
        scores.append(report.score(task, pred, rec))
    return float(np.mean(scores))


def layer_sweep(
    model: Model,
    items: Sequence[Item],
    task: str,
    layers: Sequence[int],
    *,
    method: str = "rel_att",
    holdout_fraction: float = 0.5,
    batch_size: int = 8,
    max_new_tokens: int = 20,
) -> dict:
    """Chooses the map layer on held-out questions and reports it on the others.

    Returns:
      {"method", "layers", "heldout_accuracy": {layer: %}, "best_layer", "heldout_n",
       "test_n", "test_accuracy" (best layer), "test_no_crop"}.
    """
    if not layers:
        raise ValueError("no layers to sweep")
    heldout = [it for it in items if held_out(it.example.id, holdout_fraction)]
    test = [it for it in items if not held_out(it.example.id, holdout_fraction)]
    if not heldout:
        raise ValueError(f"no held-out questions among {len(items)}; raise the fraction or n")
    acc = {}
    for layer in layers:
        engine = Engine(model, batch_size=batch_size, max_new_tokens=max_new_tokens, layer=layer)
        res = engine.answer(heldout, [method], baseline=False)
        acc[int(layer)] = _accuracy(task, heldout, res, "crop", method)
    best = max(acc, key=lambda k: (acc[k], -list(acc).index(k)))
    out = {
        "method": method,
        "layers": [int(v) for v in layers],
        "heldout_accuracy": acc,
        "best_layer": best,
        "heldout_n": len(heldout),
        "test_n": len(test),
        "test_accuracy": None,
        "test_no_crop": None,
    }
    if test:
        engine = Engine(model, batch_size=batch_size, max_new_tokens=max_new_tokens, layer=best)
        res = engine.answer(test, [method])
        out["test_accuracy"] = _accuracy(task, test, res, "crop", method)
        out["test_no_crop"] = _accuracy(task, test, res, "no_crop", method)
    return out


CROP_GROUPS = ("subject_text", "other_text", "neither")


def crop_contents(records: Sequence[dict], synthetic: Sequence[dict], inside: float = 0.8) -> dict:
    """{method: {bucket: {group: {n, crop_accuracy, no_crop_accuracy, answered_other}}}}
    over eval.run `records` of the synthetic benchmark whose data.json items (with their
    objects' text boxes) are `synthetic`; groups as in the module docstring."""
    by_id = {d["id"]: d for d in synthetic}
    missing = [r["id"] for r in records if r["id"] not in by_id]
    if missing:
        raise ValueError(f"records not in the synthetic data.json: {missing[:3]} (other set?)")
    acc: dict = {}
    for r in records:
        item = by_id[r["id"]]
        subject = item["objects"][item["subject_index"]]
        rec = {"question": r["question"], "labels": r["labels"]}
        no_crop = report.score("synthetic", r["original_answer"], rec)
        for method, m in r["methods"].items():
            if m.get("error") or m.get("bbox") is None:
                continue
            others = [o["text"] for k, o in enumerate(item["objects"])
                      if k != item["subject_index"]
                      and coverage(m["bbox"], o["text_bbox"]) >= inside]  # fmt: skip
            if coverage(m["bbox"], subject["text_bbox"]) >= inside:
                group = "subject_text"
            else:
                group = "other_text" if others else "neither"
            answer = (m.get("crop_answer") or "").strip().lower()
            cell = acc.setdefault(method, {}).setdefault(item["size_bucket"], {})
            g = cell.setdefault(group, {"n": 0, "crop": 0.0, "no_crop": 0.0, "other": 0})
            g["n"] += 1
            g["crop"] += report.score("synthetic", m.get("crop_answer"), rec)
            g["no_crop"] += no_crop
            g["other"] += int(answer in {t.lower() for t in others})
    return {
        method: {
            bucket: {
                group: {
                    "n": g["n"],
                    "crop_accuracy": round(g["crop"] / g["n"], 2),
                    "no_crop_accuracy": round(g["no_crop"] / g["n"], 2),
                    "answered_other": g["other"],
                }
                for group, g in sorted(groups.items(), key=lambda kv: CROP_GROUPS.index(kv[0]))
            }
            for bucket, groups in buckets.items()
        }
        for method, buckets in acc.items()
    }


def crop_contents_lines(result: dict) -> list[str]:
    lines = ["| method | bucket | crop holds | questions | crop acc | no-crop acc | "
             "answered the other text |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, buckets in result.items():
        for bucket in ("small", "medium", "large"):
            for group, g in buckets.get(bucket, {}).items():
                lines.append(f"| {method} | {bucket} | {group} | {g['n']} | "
                             f"{g['crop_accuracy']:.1f} | {g['no_crop_accuracy']:.1f} | "
                             f"{g['answered_other']} |")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------
# Command line (the eval.run flags plus a few).


def _items(settings, limit: int, need_box: bool) -> list[Item]:
    from eval import datasets

    examples = datasets.load(settings.task, settings.data)
    if need_box:
        examples = [e for e in examples if e.gt_bbox is not None]
        if not examples:
            raise ValueError(f"no {settings.task} question has a ground-truth box")
    items, skipped = [], 0
    for ex in examples:
        if limit and len(items) >= limit:
            break
        try:
            image, ex = datasets.load_example_image(
                ex, settings.max_image_pixels, settings.data.exif_transpose
            )
            items.append(Item(ex, image))
        except ValueError as e:
            skipped += 1
            print(f"skipping {ex.id}: {e}", file=sys.stderr)
    return items


def main(argv):
    del argv
    from absl import flags

    from eval import run as run_flags
    from vicrop_jax.loading import load_model

    f = flags.FLAGS
    s = run_flags.settings_from_flags()
    if f.analysis == "crop_contents":
        _write(s, f.analysis, *_crop_contents_from_run(s))
        return
    model = load_model(s.model, dtype=jnp.bfloat16 if s.dtype == "bfloat16" else jnp.float32)
    n = s.limit or f.analysis_examples
    if f.analysis == "attention_ratio":
        items = _items(s, n, need_box=True)
        result = ratio_summary(attention_ratios(model, items, s.batch_size))
        lines = ["| layer | mean ratio | median | share > 1 |", "|---|---|---|---|"]
        lines += [
            f"| {i} | {a:.3f} | {b:.3f} | {c:.2f} |"
            for i, (a, b, c) in enumerate(
                zip(result["mean"], result["median"], result["above_1"], strict=True)
            )
        ]
    else:
        nl = model.config.text_config.num_hidden_layers
        layers = [int(v) for v in f.sweep_layers] if f.sweep_layers else list(range(nl))
        items = _items(s, n, need_box=False)
        method = s.methods[0]
        result = layer_sweep(
            model,
            items,
            s.task,
            layers,
            method=method,
            holdout_fraction=f.holdout_fraction,
            batch_size=s.batch_size,
            max_new_tokens=s.max_new_tokens,
        )
        lines = ["| layer | held-out accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in result["heldout_accuracy"].items()]
        lines.append(
            f"\nbest layer {result['best_layer']} on {result['heldout_n']} held-out; "
            f"test ({result['test_n']}): {result['test_accuracy']} with {method}, "
            f"{result['test_no_crop']} no crop"
        )
    _write(s, f.analysis, result, lines)


def _crop_contents_from_run(s) -> tuple[dict, list[str]]:
    from eval import records

    if s.task != "synthetic":
        raise ValueError(f"--analysis=crop_contents needs --task=synthetic (got {s.task!r})")
    path = os.path.join(s.data.synthetic_dir, "data.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--synthetic_dir: no data.json at {path}; run eval.run first")
    recs = records.merged_records(s.output_dir)
    if not recs:
        raise FileNotFoundError(f"--output_dir={s.output_dir}: no eval.run records to read")
    with open(path) as fh:
        result = crop_contents(recs, json.load(fh))
    return result, crop_contents_lines(result)


def _write(s, kind: str, result: dict, lines: list[str]) -> None:
    os.makedirs(s.output_dir, exist_ok=True)
    base = os.path.join(s.output_dir, f"analysis_{kind}")
    with open(base + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    text = f"# {kind} ({s.task}, {os.path.basename(s.model)})\n\n" + "\n".join(lines)
    with open(base + ".md", "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    from absl import flags

    import eval.run
    from eval import cli

    flags.adopt_module_key_flags(eval.run)  # --help lists the shared flags too
    flags.DEFINE_enum(
        "analysis",
        "attention_ratio",
        ["attention_ratio", "layer_sweep", "crop_contents"],
        "attention_ratio: attention in the ground-truth box per layer; layer_sweep: choose "
        "the layer on held-out questions; crop_contents: what the finished run's crops hold",
    )
    flags.DEFINE_integer("analysis_examples", 200, "questions used (when --limit is 0)")
    flags.DEFINE_list("sweep_layers", None, "layers to try (default all)")
    flags.DEFINE_float("holdout_fraction", 0.5, "share of questions that choose the layer")
    cli.run(main, cli.expected_errors())
