"""A run's state: optimizer, fresh or checkpointed state, the start from another model, and
the workdir (settings.json, processor)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from eval.train_demo import export as export_lib
from eval.train_demo import losses
from eval.train_demo.config import TrainConfig
from eval.train_demo.data import build_processor
from vicrop_jax.loading import module_for
from vicrop_jax.models.llava import LlavaConfig

# ---------------------------------------------------------------------------------------
# Optimizer.


def make_optimizer(cfg: TrainConfig):
    """AdamW (decay on matrices only) after global-norm clipping; warmup + cosine to 5%;
    the `freeze` subtrees get no update."""
    lr, warmup, steps = cfg.learning_rate, max(1, cfg.warmup_steps), cfg.steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.05
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    if cfg.freeze:
        frozen = set(cfg.freeze)

        def labels(trainable):
            out = {"aux": jax.tree.map(lambda _: "train", trainable["aux"])}
            out["params"] = {
                k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v)
                for k, v in trainable["params"].items()
            }
            return out

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


# ---------------------------------------------------------------------------------------
# State: fresh, checkpointed, or from another model.


def checkpoint_manager(workdir: str):
    # Synchronous saves: the train step donates the state's buffers.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=options)  # fmt: skip


@functools.cache
def _init_fn(config: LlavaConfig):
    """The model's random init, jitted once per config."""
    v = config.vision_config
    ids = jnp.full((1, config.num_image_tokens + 1), config.image_token_index, jnp.int32)
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return jax.jit(lambda key: module_for(config).init(key, ids, pixels)["params"])


def fresh_aux(config, cfg: TrainConfig) -> dict:
    """The run's freshly initialised patch-label heads (seeded from cfg.seed)."""
    return losses.init_aux(jax.random.key(cfg.seed + 1), config.text_config.hidden_size)


def init_state(config, cfg: TrainConfig, tx):
    """Fresh state: random params (seeded), optimizer state, step 0."""
    params = _init_fn(config)(jax.random.key(cfg.seed))
    aux = fresh_aux(config, cfg)
    return {"params": params, "aux": aux, "opt_state": tx.init({"params": params, "aux": aux}),
            "step": jnp.zeros((), jnp.int32)}  # fmt: skip


def abstract_state(config, tx):
    """The state's shapes and dtypes, without computing it (what a restore needs)."""
    params = export_lib.param_shapes(config)
    aux = jax.eval_shape(lambda: losses.init_aux(jax.random.key(0),
                                                 config.text_config.hidden_size))  # fmt: skip
    step = jax.ShapeDtypeStruct((), jnp.int32)
    opt_state = jax.eval_shape(tx.init, {"params": params, "aux": aux})
    return {"params": params, "aux": aux, "opt_state": opt_state, "step": step}


def restore_latest(manager, like):
    """The latest checkpointed state shaped like `like` (ShapeDtypeStructs), or None."""
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.StandardRestore(like))


def save_state(manager, state) -> None:
    step = int(state["step"])
    if manager.latest_step() != step:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()


def init_from_run(cfg: TrainConfig, config, tx):
    """Step-0 state of a fine-tuning run, a fresh optimizer and the model of `cfg.init_from`
    (same dims): either a training workdir (the params and patch-label heads of its latest
    checkpoint) or an exported HF directory (its params, fresh heads)."""
    src = cfg.init_from
    path = os.path.join(src, "settings.json")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(src, "config.json")):
        params = export_lib.load_export(src, config)
        return _fine_tune_state(cfg, config, tx, params, fresh_aux(config, cfg))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--init_from={src}: neither a training workdir (settings.json) nor an exported "
            "model (config.json)"
        )
    with open(path) as f:
        source = json.load(f)  # the source run's identity
    dims = source["dims"]
    if dims != dataclasses.asdict(cfg.dims):
        raise ValueError(f"--init_from={src} holds a model of other dims: {dims}")
    manager = checkpoint_manager(src)
    # Restored with the source run's own optimizer structure (a --freeze run's differs).
    source_tx, _ = make_optimizer(dataclasses.replace(cfg, freeze=tuple(source.get("freeze", ()))))
    state = restore_latest(manager, abstract_state(config, source_tx))
    manager.close()
    if state is None:
        raise FileNotFoundError(f"--init_from={src}: no checkpoint under {src}/checkpoints")
    return _fine_tune_state(cfg, config, tx, state["params"], state["aux"])


def _fine_tune_state(cfg: TrainConfig, config, tx, params, aux) -> dict:
    """Step-0 state from given params and heads: --reinit subtrees afresh, a new optimizer."""
    if cfg.reinit:
        fresh = _init_fn(config)(jax.random.key(cfg.seed))
        params = {**params, **{k: fresh[k] for k in cfg.reinit}}
    trainable = {"params": params, "aux": aux}
    return {**trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}


# ---------------------------------------------------------------------------------------
# Workdir.


def _check_identity(cfg: TrainConfig) -> None:
    """Writes settings.json, or refuses a workdir that holds a different run."""
    path = os.path.join(cfg.workdir, "settings.json")
    want = cfg.identity()
    if os.path.isfile(path):
        with open(path) as f:
            have = json.load(f)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{cfg.workdir} holds another run (differs in {diff}); "
                             "use a new --workdir")  # fmt: skip
        return
    with open(path, "w") as f:
        json.dump(want, f, indent=1)


def setup(cfg: TrainConfig):
    """(processor, LlavaConfig, hf config dict) of a run; writes workdir/processor."""
    os.makedirs(cfg.workdir, exist_ok=True)
    _check_identity(cfg)
    processor = build_processor(os.path.join(cfg.workdir, "processor"), cfg.dims)
    hf_cfg = export_lib.hf_config(cfg.dims, processor.tokenizer)
    return processor, LlavaConfig.from_dict(hf_cfg), hf_cfg


def latest(cfg: TrainConfig):
    """(processor, LlavaConfig, hf config, state) of cfg.workdir's latest checkpoint."""
    processor, config, hf_cfg = setup(cfg)
    tx, _ = make_optimizer(cfg)
    manager = checkpoint_manager(cfg.workdir)
    state = restore_latest(manager, abstract_state(config, tx))
    manager.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint under {cfg.workdir}/checkpoints")
    return processor, config, hf_cfg, state


def export_latest(cfg: TrainConfig) -> str:
    """Exports the latest checkpoint of cfg.workdir to cfg.export_dir."""
    processor, _, hf_cfg, state = latest(cfg)
    return export_lib.export(state["params"], hf_cfg, processor, cfg.export_dir)
