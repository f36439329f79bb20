"""Meshes and logical-axis sharding rules.

The model names every parameter dimension with a logical axis ("embed", "mlp",
...); the rules in config map those names to mesh axes ("data", "fsdp",
"tensor"). This module turns the two into `NamedSharding`s, and refuses rules
that would silently replicate: a rule naming a mesh axis that does not exist, a
logical name no rule covers, or a dimension the mesh axes do not divide.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax.errors import FmjaxError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


class ShardingError(FmjaxError, ValueError):
    """A mesh or a sharding rule that cannot work; the message names it."""


def batch_devices(batch: int, axes: Sequence[str] = BATCH_AXES) -> int:
    """How many devices a batch of `batch` rows is split over: the product of
    the batch axes (or of those of `axes`, a leading part of them) of the mesh
    in the current `jax.set_mesh` context, or 1 (no mesh, or one that does not
    divide `batch`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return 1
    if batch % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return 1
    return math.prod(mesh.shape[a] for a in axes)


def positions_per_chunk(
    batch: int, length: int, per_position: int, max_elements: int
) -> int:
    """How many of `length` positions to process at once so that one chunk of
    a [batch, length, per_position] intermediate (the LM head's logits, an
    attention layer's scores) holds at most `max_elements` per device, the
    batch split as `batch_devices` says; `length` (no chunking) when the whole
    fits or `max_elements` is 0. A power of two, then evened out over the
    chunks it implies (100 positions with room for 30: 7 chunks of 15).

    The only place the models read the mesh: to size chunks per device. What
    they compute does not depend on it."""
    rows = batch // batch_devices(batch)
    if max_elements <= 0 or rows * length * per_position <= max_elements:
        return length
    fit = max(1, max_elements // (rows * per_position))
    chunk = min(length, 1 << (fit.bit_length() - 1))
    num_chunks = -(-length // chunk)
    return -(-length // num_chunks)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple:
    """Resolves -1 entries ("the rest") and checks the product is `num_devices`."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ShardingError(f"mesh {sizes}: at most one axis may be -1, got {free}")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ShardingError(f"mesh.{name}={size}: expected a positive size or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh {sizes}: {num_devices} devices are not divisible by the fixed "
                f"axes' product {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices, but "
            f"{num_devices} are available"
        )
    return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def mesh_from_config(mesh_config) -> Mesh:
    """The mesh of a config's `mesh` group: sizes per axis (-1 = the rest) over the
    first `num_devices` devices (0 = all of them)."""
    devices = jax.devices()
    wanted = mesh_config.get("num_devices", 0)
    if wanted:
        if not 0 < wanted <= len(devices):
            raise ShardingError(
                f"mesh.num_devices={wanted}: expected 1..{len(devices)} "
                f"(the devices available), or 0 for all"
            )
        devices = devices[:wanted]
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices)


def normalize_rules(rules: Rules, mesh: Mesh) -> tuple:
    """Rules as a tuple of (logical, mesh-axes tuple | None); checks mesh axes."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ShardingError(
                f"sharding rule {rule!r}: expected (logical, mesh axes)"
            )
        logical, axes = rule
        if axes is None:
            out.append((logical, None))
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ShardingError(
                    f"sharding rule {logical!r} -> {axis!r}: mesh has no axis {axis!r};"
                    f" its axes are {mesh.axis_names}"
                )
        out.append((logical, axes))
    return tuple(out)


def spec_for(
    names: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh, path=""
) -> PartitionSpec:
    """The PartitionSpec of one array whose dimensions carry logical `names`."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ShardingError(
                f"{path}: logical axis {name!r} (dim {dim} of shape {tuple(shape)}) "
                f"has no sharding rule; rules cover {sorted(table)}"
            )
        # A mesh axis shards at most one dimension of an array.
        axes = tuple(a for a in (table[name] or ()) if a not in used)
        used.update(axes)
        ways = math.prod(mesh.shape[a] for a in axes)
        if size % ways:
            raise ShardingError(
                f"{path}: dim {dim} ({name!r}) of shape {tuple(shape)} has size "
                f"{size}, not divisible by mesh axes {axes} of total size {ways}"
            )
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def shardings_for(abstract_boxed, mesh: Mesh, rules: Rules):
    """NamedShardings for a pytree whose leaves may be `nn.Partitioned` boxes.

    Unboxed leaves (step counters, optimizer scalars) are replicated. The result
    has the structure of the *unboxed* tree.
    """
    rules = normalize_rules(rules, mesh)

    def one(path, leaf):
        if isinstance(leaf, nn.Partitioned):
            names, shape = leaf.names, leaf.value.shape
            spec = spec_for(names, shape, rules, mesh, _path_str(path))
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def _trailing_dict_keys(path) -> tuple[str, ...]:
    keys = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        keys.append(str(key.key))
    return tuple(reversed(keys))


def shardings_like_params(abstract, boxed_params, mesh: Mesh, rules: Rules):
    """NamedShardings for any tree holding copies of a model's params (trained
    params, a frozen base, optimizer moments): a leaf whose trailing dict keys end
    with a param's path, at the param's shape, gets that param's sharding; every
    other leaf (adapters, NF4 codes, counters) is replicated.
    """
    param_shardings = shardings_for(boxed_params, mesh, rules)
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[_trailing_dict_keys(path)] = sharding
    unboxed = nn.unbox(boxed_params)
    shapes = {
        _trailing_dict_keys(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(unboxed)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = _trailing_dict_keys(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in by_path and shapes[suffix] == tuple(leaf.shape):
                return by_path[suffix]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract)


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (rank - 1))))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's local numpy batch into global sharded arrays."""
    return {
        key: jax.make_array_from_process_local_data(
            batch_sharding(mesh, np.ndim(value)), np.asarray(value)
        )
        for key, value in local_batch.items()
    }


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
    """Mesh + logical rules in scope, so the model's activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules, mesh)):
        yield


def bytes_per_device(shardings, abstract) -> int:
    """Largest per-device byte count of the arrays in `abstract` under `shardings`."""
    total = 0
    for sharding, leaf in zip(
        jax.tree.leaves(shardings), jax.tree.leaves(abstract), strict=True
    ):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
