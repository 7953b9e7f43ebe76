"""The loop: jitted steps, logging, checkpoints every few steps, held-out evals, and the
export after the last step."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import time

import jax
import numpy as np
import optax
from tqdm import tqdm

from eval.train_demo import export as export_lib
from eval.train_demo import losses
from eval.train_demo.config import TrainConfig
from eval.train_demo.data import BUCKETS, LOG_ONLY, Data
from eval.train_demo.probes import evaluate
from eval.train_demo.state import (
    abstract_state,
    checkpoint_manager,
    init_from_run,
    init_state,
    make_optimizer,
    restore_latest,
    save_state,
    setup,
)
from vicrop_jax.importance import default_layer
from vicrop_jax.loading import Model, module_for
from vicrop_jax.models.llava import LlavaConfig

# ---------------------------------------------------------------------------------------
# Steps.


def _update(tx, state, loss):
    """One optimizer step on {"params", "aux"}: loss(trainable) -> (value, extras).
    Returns (new state, value, extras, gradient norm of the model params)."""
    trainable = {"params": state["params"], "aux": state["aux"]}
    (value, extras), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new = optax.apply_updates(trainable, updates)
    state = {**new, "opt_state": opt_state, "step": state["step"] + 1}
    return state, value, extras, optax.tree.norm(grads["params"])


def make_train_step(module, tx, weights: losses.LossWeights, att_layer: int):
    """A jitted (state, batch) -> (state, metrics); state = {params, aux, opt_state, step}
    (aux: the patch-label heads; the optimizer updates {"params", "aux"})."""

    def step(state, batch):
        def f(trainable):
            return losses.loss_fn(module, trainable["params"], batch, weights, att_layer,
                                  trainable["aux"])  # fmt: skip

        state, loss, metrics, grad_norm = _update(tx, state, f)
        return state, {**metrics, "loss": loss, "grad_norm": grad_norm}

    return jax.jit(step, donate_argnums=0)


def make_pretrain_step(module, tx):
    """A jitted (state, batch) -> (state, metrics) on the patch-label loss alone: the vision
    tower, projector and heads learn to tell glyphs and shapes apart (the stage LLaVA gets
    from a pretrained CLIP); the same optimizer, so its moments carry over."""

    def step(state, batch):
        def f(trainable):
            feats = losses.image_features(module, trainable["params"], batch["pixel_values"])
            return losses.patch_loss(trainable["aux"], feats, batch["patch_labels"])

        state, loss, acc, grad_norm = _update(tx, state, f)
        return state, {"loss_patch": loss, "acc_patch_glyph": acc, "grad_norm": grad_norm}

    return jax.jit(step, donate_argnums=0)


# The fields a compiled step depends on; runs in one process that share them (a resumed
# run, tests) share one compiled step.
_STEP_FIELDS = ("learning_rate", "warmup_steps", "weight_decay", "grad_clip", "steps", "freeze",
                "patch_loss_weight", "attention_loss_weight", "general_loss_weight",
                "ratio_peak_weight", "pair_attention_weight")  # fmt: skip


def _step_config(cfg: TrainConfig) -> TrainConfig:
    return TrainConfig(**{k: getattr(cfg, k) for k in _STEP_FIELDS})


def compiled_step(config: LlavaConfig, cfg: TrainConfig):
    """(train step, optimizer, schedule) of a run."""
    return _compiled(config, _step_config(cfg))


@functools.cache
def _compiled(config: LlavaConfig, cfg: TrainConfig):
    tx, schedule = make_optimizer(cfg)
    layer = default_layer("llava", config.text_config.num_hidden_layers)
    step = make_train_step(module_for(config), tx, losses.LossWeights.of(cfg), layer)
    return step, tx, schedule


def compiled_pretrain_step(config: LlavaConfig, cfg: TrainConfig):
    """The pretraining step, shared like `compiled_step`'s (same optimizer object)."""
    return _compiled_pretrain(config, _step_config(cfg))


@functools.cache
def _compiled_pretrain(config: LlavaConfig, cfg: TrainConfig):
    return make_pretrain_step(module_for(config), _compiled(config, cfg)[1])


# ---------------------------------------------------------------------------------------
# The loop.


def _append_json(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> dict:
    """Trains (resuming from the latest checkpoint), evaluates, exports; returns the state."""
    processor, config, hf_cfg = setup(cfg)
    train_step, tx, schedule = compiled_step(config, cfg)
    pretrain_steps = cfg.pretrain_steps
    pretrain_step = compiled_pretrain_step(config, cfg) if pretrain_steps else None
    manager = checkpoint_manager(cfg.workdir)
    state = restore_latest(manager, abstract_state(config, tx))
    if state is None and cfg.init_from:
        state = init_from_run(cfg, config, tx)
    state = init_state(config, cfg, tx) if state is None else state
    start = int(state["step"])
    stop = min(cfg.steps, cfg.stop_at or cfg.steps)
    log_path = os.path.join(cfg.workdir, "log.jsonl")
    model = Model(config=config, params=None, processor=processor, hf_config=hf_cfg)
    data = Data(cfg, processor)

    def run_eval(step):
        t0 = time.perf_counter()
        res = evaluate(model, state["params"], cfg)
        _append_json(log_path, {"kind": "eval", "step": step, **res,
                                "seconds": time.perf_counter() - t0})  # fmt: skip
        shown = {k: res[k] for k in ("full", "rel_att", "gt_crop")}
        tqdm.write(f"eval @ {step}: " + json.dumps(shown))

    if start == 0 and cfg.eval_every and stop > 0 and not pretrain_steps:
        run_eval(0)
    window = collections.defaultdict(list)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # renders the next batch during a step
    batch_fn = lambda i: data.pretrain_batch(i) if i < pretrain_steps else data.batch(i)
    pending = pool.submit(batch_fn, start) if start < stop else None
    bar = tqdm(total=stop, initial=start, disable=not cfg.progress, dynamic_ncols=True)
    t_last = time.perf_counter()
    for step in range(start, stop):
        batch = pending.result()
        if step + 1 < stop:
            pending = pool.submit(batch_fn, step + 1)
        if step < pretrain_steps:
            state, metrics = pretrain_step(state, batch)
            metrics = jax.device_get(metrics)
            for k in ("loss_patch", "acc_patch_glyph", "grad_norm"):
                window[k].append(float(metrics[k]))
            window["loss"].append(float(metrics["loss_patch"]))
            bar.update(1)
            bar.set_postfix(pretrain_loss=f"{np.mean(window['loss'][-50:]):.3f}",
                            glyph=f"{np.mean(window['acc_patch_glyph'][-50:]):.2f}")  # fmt: skip
        else:
            state, metrics = train_step(state, {k: v for k, v in batch.items()
                                                if k not in LOG_ONLY})  # fmt: skip
            metrics = jax.device_get(metrics)
            record_step(window, metrics, batch["bucket"], batch["crop_has_subject"])
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window['loss'][-50:]):.3f}",
                            acc1=f"{np.mean(window['acc_single'][-400:]):.2f}",
                            acc2=f"{np.mean(window['acc_pair'][-400:]):.2f}",
                            glyph=f"{np.mean(window['acc_patch_glyph'][-50:]):.2f}")  # fmt: skip
        done = step + 1
        if done % cfg.log_every == 0 or done == stop or done == pretrain_steps:
            now = time.perf_counter()
            rec = {k: round(float(np.mean(v)), 4) for k, v in window.items()}
            rec.update(kind="pretrain" if step < pretrain_steps else "train", step=done,
                       lr=float(schedule(done)),
                       steps_per_s=round(len(window["loss"]) / (now - t_last), 4))  # fmt: skip
            _append_json(log_path, rec)
            window.clear()
            t_last = now
        if done % cfg.checkpoint_every == 0 or done == stop:
            save_state(manager, state)
        if (
            cfg.eval_every
            and done > pretrain_steps
            and (done % cfg.eval_every == 0 or done == cfg.steps)
        ):
            run_eval(done)
            t_last = time.perf_counter()  # steps_per_s counts training only
    bar.close()
    pool.shutdown()
    if cfg.export_dir and int(state["step"]) == cfg.steps:
        export_lib.export(state["params"], hf_cfg, processor, cfg.export_dir)
    manager.close()
    return state


# Scalar metrics averaged over the log window when a step reports them.
_SCALARS = ("grad_norm", "att_subject", "loss_patch", "acc_patch_glyph", "loss_general",
            "att_subject_general", "att_subject_pair", "loss_ratio_peak", "loss_contrast",
            "acc_contrast", "loss_pair_contrast", "acc_pair_contrast")  # fmt: skip


def record_step(window, metrics, buckets, crop_has_subject) -> None:
    """Adds one train step's metrics to the logging window (acc_pair_miss_<bucket>: the pair
    prompts whose crop does not hold the subject)."""
    window["loss"].append(float(metrics["loss"]))
    for name in ("single", "pair"):
        window[f"loss_{name}"].append(float(metrics[f"loss_{name}"]))
        for b, right in zip(buckets, metrics[f"correct_{name}"], strict=True):
            window[f"acc_{name}_{BUCKETS[b]}"].append(float(right))
        window[f"acc_{name}"].extend(float(x) for x in metrics[f"correct_{name}"])
    for b, right, has in zip(buckets, metrics["correct_pair"], crop_has_subject, strict=True):
        if not has:
            window[f"acc_pair_miss_{BUCKETS[b]}"].append(float(right))
    for k in _SCALARS:
        if k in metrics:
            window[k].append(float(metrics[k]))
    if "ratio_peak_on_subject" in metrics:  # per row: is rel-att's map highest on the subject
        for b, on in zip(buckets, metrics["ratio_peak_on_subject"], strict=True):
            window[f"ratio_peak_subject_{BUCKETS[b]}"].append(float(on))
