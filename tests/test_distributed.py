"""Replication and batch placement on 8 virtual devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpsgd_jax import distributed as D
from helpers import flat_mesh

N = 8


def test_replicate_matches_pmap_output_sharding():
    mesh = flat_mesh()
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": jnp.zeros((), jnp.int32)}
    rep = D.replicate(tree, mesh)
    assert rep["w"].shape == (N, 2, 3) and rep["step"].shape == (N,)
    for i in range(N):
        np.testing.assert_array_equal(np.asarray(rep["w"])[i], tree["w"])
    out = jax.pmap(lambda t: t, axis_name="batch")(rep)
    # Same sharding in and out: the first call and later calls share one executable.
    assert out["w"].sharding == rep["w"].sharding
    np.testing.assert_array_equal(D.unreplicate(rep)["w"], tree["w"])


def test_shard_batch_places_rows_on_devices():
    mesh = flat_mesh()
    batch = {"x": np.arange(N * 3 * 2, dtype=np.float32).reshape(N, 3, 2)}
    placed = D.shard_batch(batch, mesh)
    for shard in placed["x"].addressable_shards:
        i = shard.index[0].start
        np.testing.assert_array_equal(np.asarray(shard.data)[0], batch["x"][i])


@pytest.mark.parametrize("shape", [(4, 3), (16,), ()])
def test_check_leading_dim_rejects_wrong_layouts(shape):
    with pytest.raises(ValueError, match=r"\['x'\].*number of workers \(8\)"):
        D.check_leading_dim({"x": np.zeros(shape)}, N)


def test_workers_of_a_subset_of_devices():
    mesh = D.workers(devices=jax.devices()[:4], axis_name="workers").mesh
    assert mesh.axis_names == ("workers",) and mesh.devices.size == 4
