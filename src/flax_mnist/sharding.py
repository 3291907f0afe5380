"""Where arrays live: the device mesh (axes ``seed`` and ``data``), putting state and data on it,
and reading results back to the host, on one device, many, or many hosts.

Data parallelism is by annotation (``batch_sharding``): params, BatchNorm statistics,
optimizer state and the MNIST arrays (47 MB uint8) are replicated; each batch's rows are split
over ``data``; vmapped seeds over ``seed``. No pmap, no second code path.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS, SEED_AXIS = "data", "seed"


def make_mesh(seed_devices: int, data_devices: int) -> Mesh:
  """A (seed, data) mesh over the first ``seed_devices * data_devices`` devices.

  Auto axes: ``jax.make_mesh`` defaults to Explicit axes in this JAX (0.10), with which
  ``with_sharding_constraint`` raises and the pooling reshape fails.
  """
  devices = jax.devices()[: seed_devices * data_devices]
  return jax.make_mesh(
    (seed_devices, data_devices),
    (SEED_AXIS, DATA_AXIS),
    axis_types=(AxisType.Auto, AxisType.Auto),
    devices=devices,
  )


def training_mesh(seed_devices: int, data_devices: int) -> Mesh | None:
  """The (seed, data) mesh a run trains on, or None for one device in one process: then nothing
  is annotated and the program is exactly the single-device one."""
  if seed_devices * data_devices == 1 and jax.process_count() == 1:
    return None
  return make_mesh(seed_devices, data_devices)


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
  """Rows of (steps, batch, ...) arrays over the mesh's ``data`` axis; None on one device (the
  single-device program then has no annotation at all, so it is the one tested bit for bit)."""
  if mesh is None or mesh.shape[DATA_AXIS] == 1:
    return None
  return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def seed_axis(mesh: Mesh | None) -> str | None:
  """The mesh axis vmapped seeds are split over, if there is more than one device on it."""
  return SEED_AXIS if mesh is not None and mesh.shape[SEED_AXIS] > 1 else None


def mesh_shape(mesh: Mesh) -> dict[str, int]:
  """``{"seed": S, "data": D}``: what run.json records."""
  return {name: int(size) for name, size in mesh.shape.items()}


def _put(leaf: Any, sharding: NamedSharding) -> Any:
  """One array placed with ``sharding``. A committed local array cannot be ``device_put`` to a
  sharding that spans processes: it goes through numpy (every process holds the same values);
  an array already spread over the processes is resharded by a compiled identity."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return jax.jit(lambda array: array, out_shardings=sharding)(leaf)
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = _put(jax.random.key_data(leaf), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  return jax.device_put(np.asarray(leaf), sharding)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """``tree`` replicated on every device of ``mesh`` (unchanged when there is no mesh)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda leaf: _put(leaf, sharding), tree)


def place(tree: Any, mesh: Mesh | None) -> Any:
  """Host arrays on device: on the default device without a mesh, replicated over it with one."""
  if mesh is None:
    return jax.tree.map(jax.device_put, tree)
  return replicate(tree, mesh)


def split_seeds(tree: Any, mesh: Mesh | None) -> Any:
  """A stacked-over-seeds ``tree``, its leading axis split over ``seed``, the rest replicated."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, PartitionSpec(SEED_AXIS))
  return jax.tree.map(lambda leaf: _put(leaf, sharding), tree)


def to_host(tree: Any) -> Any:
  """``tree`` as numpy, read on every process: a replicated array from a local copy, one split
  over devices of several hosts gathered first (``device_get`` fails on those)."""

  def read(leaf: Any) -> Any:
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
      return jax.device_get(leaf)
    if leaf.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    return multihost_utils.process_allgather(leaf, tiled=True)

  return jax.tree.map(read, tree)
