"""Parameters and batches over a 2-D device mesh (data, model), partitioned by GSPMD.

`DATA` splits the batch: the first axis of every batched input (data parallelism). `MODEL`
splits the parameters (tensor parallelism, as Megatron-LM lays out a transformer): the query,
key, value, gate and up projections by their output columns (attention heads, MLP hidden
units), the output and down projections by their input rows, the token embedding and the LM
head by the vocabulary; norms and small towers are replicated. XLA's SPMD partitioner places
the collectives; nothing here is written per device.

A family declares its layout once, in its models file (vicrop_jax.models.<family>), as two
functions of its config that `Family.partition_rules` / `Family.model_split_sizes` return:

  partition_rules(config)     ((regex, PartitionSpec), ...): the first regex that matches a
                              param's "/"-joined path (`re.fullmatch`) gives its spec; every
                              param must match one
  model_split_sizes(config)   {config field: size} of every dimension split over MODEL
                              (heads, key/value heads, MLP hidden, vocabulary): a mesh whose
                              model axis does not divide one is refused, naming it, before
                              any weight is read (`check_model_axis`)

`constrain` pins an intermediate's layout (the KV cache over heads) when a mesh is in
context (`jax.set_mesh`), and is the identity otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)
# A KV cache layer [B, K, G, H]: rows over data, key/value heads over model.
CACHE_SPEC = PartitionSpec(DATA, None, MODEL, None)
Rules = Sequence[tuple[str, PartitionSpec]]


def parse_mesh_shape(text: str | None, n_devices: int | None = None) -> tuple[int, int]:
    """ "data:2,model:4" -> (2, 4). An axis left out takes the devices the other leaves
    (n_devices / size; with n_devices None, 1); empty or None: every device on data.

    Raises:
      ValueError: one line naming the bad entry, or a shape that does not use n_devices.
    """
    sizes: dict[str, int] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"mesh_shape entry {part!r}: expected data:N or model:N")
        if name in sizes:
            raise ValueError(f"mesh_shape names {name!r} twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"mesh_shape {name}: must be a positive int, got {value.strip()!r}")
        sizes[name] = size
    for name in AXES:
        if name not in sizes:
            other = math.prod(sizes.values())
            if n_devices is not None and n_devices % other:
                raise ValueError(f"mesh_shape {text!r} does not divide the {n_devices} devices")
            sizes[name] = 1 if n_devices is None else n_devices // other
    shape = (sizes[DATA], sizes[MODEL])
    if n_devices is not None and math.prod(shape) != n_devices:
        raise ValueError(
            f"mesh_shape {text!r} is {shape[0]} x {shape[1]} = {math.prod(shape)} devices, "
            f"but {n_devices} are available"
        )
    return shape


def make_mesh(shape: str | tuple[int, int] | None = None, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: this process's), shape as
    `parse_mesh_shape` reads it or a (data, model) tuple; default all on data."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not isinstance(shape, tuple):
        shape = parse_mesh_shape(shape, len(devices))
    elif math.prod(shape) != len(devices):
        raise ValueError(f"a {shape[0]} x {shape[1]} mesh needs {math.prod(shape)} devices, "
                         f"got {len(devices)}")  # fmt: skip
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def axis_size(mesh, name: str) -> int:
    """Size of a mesh axis (1 for a mesh without it, or no mesh)."""
    return 1 if mesh is None else dict(mesh.shape).get(name, 1)


def check_model_axis(sizes: Mapping[str, int], model_axis: int) -> None:
    """Refuses a model axis that does not divide a dimension split over it.

    Raises:
      ValueError: one line naming the first such dimension.
    """
    for name, size in sizes.items():
        if size % model_axis:
            raise ValueError(
                f"the mesh's model axis ({model_axis}) does not divide {name} ({size}); "
                f"choose a model axis that divides it"
            )


def path_name(path) -> str:
    """A pytree key path as "a/b/c" (the names partition rules match)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_specs(tree, rules: Rules):
    """The PartitionSpec of every leaf of a param tree, by the first matching rule.

    Raises:
      ValueError: listing every param no rule matches, or whose spec does not fit its rank.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    unmatched, bad = [], []

    def spec_of(path, leaf):
        name = path_name(path)
        for pattern, spec in compiled:
            if pattern.fullmatch(name):
                if len(spec) > len(leaf.shape):
                    bad.append(f"{name} {tuple(leaf.shape)}: {spec}")
                return spec
        unmatched.append(name)
        return PartitionSpec()

    specs = jax.tree_util.tree_map_with_path(spec_of, tree)
    if unmatched or bad:
        raise ValueError(
            "partition rules do not cover the params: "
            + "; ".join([*(f"no rule for {n}" for n in unmatched), *(f"rank: {b}" for b in bad)])
        )
    return specs


def shardings(mesh: Mesh, specs):
    """A tree of NamedSharding on `mesh` from a tree of PartitionSpec."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))  # fmt: skip


def with_shardings(abstract, mesh: Mesh, specs):
    """ShapeDtypeStructs carrying their sharding: what a loader fills shard by shard."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, shardings(mesh, specs),
    )  # fmt: skip


def place_tree(tree, mesh: Mesh, specs):
    """Each leaf of `tree` put on the mesh with its spec (one device_put per leaf, so no
    device holds more than its shards of the tree at once)."""
    return jax.tree.map(jax.device_put, tree, shardings(mesh, specs))


def shard_bytes(shape: Sequence[int], dtype, spec: PartitionSpec, sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of an array of `shape` laid out by `spec` on a mesh of
    axis `sizes` (an uneven split rounds up, as XLA pads it)."""
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= -(-dim // math.prod(sizes.get(a, 1) for a in axes))
    return n * np.dtype(dtype).itemsize


def batch_spec(shape: Sequence[int], mesh) -> PartitionSpec:
    """Split the first axis over DATA where it divides, else replicate (a leading axis that
    is not a batch of the data size, e.g. LLaVA-NeXT's tiles of several images)."""
    n = axis_size(mesh, DATA)
    if len(shape) and shape[0] % n == 0:
        return PartitionSpec(DATA, *([None] * (len(shape) - 1)))
    return PartitionSpec()


def place_batch(mesh: Mesh):
    """np.ndarray -> jax.Array on `mesh`, the first axis split over DATA (`batch_spec`)."""

    def place(x):
        x = np.asarray(x)
        return jax.device_put(x, NamedSharding(mesh, batch_spec(x.shape, mesh)))

    return place


def constrain(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    """with_sharding_constraint(x, spec) under a context mesh (`jax.set_mesh`) that has the
    spec's axes, leaving out an axis that does not divide its dimension; else x itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    sizes = dict(mesh.shape)
    kept = []
    for dim, axis in zip(x.shape, spec, strict=False):
        ok = axis is not None and axis in sizes and dim % sizes[axis] == 0
        kept.append(axis if ok else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*kept))
