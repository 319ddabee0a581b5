"""Collectives: QSGD quantiser properties and tree means on 8 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpsgd_jax import collectives as C, comm

N = 8


@pytest.mark.parametrize("levels,bucket", [(1, None), (4, None), (127, 16), (300, 7)])
def test_qsgd_is_unbiased(levels, bucket):
    v = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7)), jnp.float32)
    draws = 20000
    keys = jax.random.split(jax.random.PRNGKey(1), draws)
    quantise = lambda k: C.qsgd_dequantize(*C.qsgd_quantize(v, k, levels, bucket), levels, v.shape)  # noqa: E731
    q = jax.jit(jax.vmap(quantise))(keys)
    mean, std = np.asarray(q.mean(axis=0)), np.asarray(q.std(axis=0))
    # Each coordinate's sample mean lies within 5 standard errors of v.
    np.testing.assert_array_less(np.abs(mean - np.asarray(v)), 5 * std / math.sqrt(draws) + 1e-6)
    assert np.any(std > 0)  # genuinely stochastic


@pytest.mark.parametrize("levels,dtype", [(3, jnp.int8), (127, jnp.int8), (128, jnp.int16)])
def test_qsgd_levels_respected(levels, dtype):
    v = jnp.asarray(np.random.default_rng(2).normal(size=(300,)), jnp.float32)
    signed, norms = C.qsgd_quantize(v, jax.random.PRNGKey(0), levels, bucket_size=64)
    assert signed.dtype == dtype and signed.shape == (5, 64) and norms.shape == (5,)
    xi = np.abs(np.asarray(signed, np.int64))
    assert xi.max() <= levels and xi.min() >= 0
    # xi_j is floor or floor + 1 of s |v_j| / ||v||, with the sign of v_j.
    rows = np.pad(np.asarray(v), (0, 20)).reshape(5, 64)
    scaled = levels * np.abs(rows) / np.linalg.norm(rows, axis=1, keepdims=True)
    assert np.all((xi == np.floor(scaled)) | (xi == np.floor(scaled) + 1))
    nz = rows != 0
    assert np.all((np.sign(np.asarray(signed))[nz] == np.sign(rows)[nz]) | (xi[nz] == 0))
    np.testing.assert_allclose(norms, np.linalg.norm(rows, axis=1), rtol=1e-6)


def test_qsgd_zero_vector_stays_zero():
    signed, norms = C.qsgd_quantize(jnp.zeros(10), jax.random.PRNGKey(0), 4)
    assert not np.any(np.asarray(signed)) and float(norms[0]) == 0.0


@pytest.mark.parametrize("levels", [3, 15, 300])  # the three wire forms: nibbles, int8, int16
def test_qsgd_mean_is_mean_of_workers_dequantised_messages(levels):
    # 33 coordinates in buckets of 8: a padded last bucket, an odd number of packed levels.
    g = jnp.asarray(np.random.default_rng(3).normal(size=(N, 33)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(4), N)

    def both(x, k):  # the mean, and the same mean with the int8 / int16 levels gathered as they are
        q, norms = C.qsgd_quantize(x, jax.random.split(k, 1)[0], levels, 8)
        q_all, norms_all = C.all_gather(q, "i"), C.all_gather(norms, "i")
        unpacked = jnp.mean(C.qsgd_dequantize(q_all, norms_all, levels, (33,)), axis=0)
        return C.qsgd_mean({"g": x}, k, levels, "i", bucket_size=8), unpacked

    mean, unpacked = jax.pmap(both, axis_name="i")(g, keys)
    leaf_keys = [jax.random.split(keys[i], 1)[0] for i in range(N)]  # one key per leaf
    each = [C.qsgd_dequantize(*C.qsgd_quantize(g[i], leaf_keys[i], levels, 8), levels, (33,)) for i in range(N)]
    np.testing.assert_allclose(mean["g"], np.broadcast_to(np.mean(each, axis=0), (N, 33)), rtol=1e-5, atol=1e-6)
    # Packing changes what travels, not the result: bit for bit the mean of the unpacked levels.
    np.testing.assert_array_equal(mean["g"], unpacked)


@pytest.mark.parametrize("levels", [1, 7, 8, 127, 128, 32767])
@pytest.mark.parametrize("length", [1, "all"])
def test_qsgd_pack_round_trip_every_level(levels, length):
    # Every level in [-s, s] and two more (an odd length), or only the first, there and back.
    length = 2 * levels + 3 if length == "all" else length
    dtype = np.int8 if levels <= 127 else np.int16
    signed = np.resize(np.arange(-levels, levels + 1), length).astype(dtype).reshape(length, 1)
    wire = C.qsgd_pack(jnp.asarray(signed), levels)
    assert wire.ndim == 1 and wire.dtype == (jnp.uint8 if levels <= 7 else dtype)
    assert wire.size * wire.dtype.itemsize == math.ceil(length * comm.qsgd_level_bits(levels) / 8)
    back = C.qsgd_unpack(wire, levels, signed.shape)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, signed)
    # With leading (worker) axes, as after the all-gather.
    stacked = C.qsgd_unpack(jnp.stack([wire, wire]), levels, signed.shape)
    np.testing.assert_array_equal(stacked, np.stack([signed, signed]))


@pytest.mark.parametrize("levels", [1, 7, 8, 127, 128])
@pytest.mark.parametrize("shape,bucket", [((33,), 8), ((5, 7), None), ((5, 7), 4), ((1,), 4), ((64,), 16)])
def test_qsgd_bytes_are_the_arrays_sent(levels, shape, bucket):
    # The arrays a worker all-gathers for a leaf, its packed levels and its norms, from their shapes alone.
    def message(v, key):
        q, norms = C.qsgd_quantize(v, key, levels, bucket)
        return C.qsgd_pack(q, levels), norms

    sent = jax.eval_shape(message, jax.ShapeDtypeStruct(shape, jnp.float32), jax.random.PRNGKey(0))
    assert comm.qsgd_bytes({"g": jax.ShapeDtypeStruct(shape, jnp.float32)}, levels, bucket) == comm.tree_bytes(sent)


def test_qsgd_bytes_formula():
    tree = {"a": jax.ShapeDtypeStruct((10, 10), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    assert [comm.qsgd_level_bits(s) for s in (1, 7, 8, 127, 128, 32767)] == [4, 4, 8, 8, 16, 16]
    # s = 7, one bucket per leaf: 4 bits per coordinate and one 4-byte norm.
    assert comm.qsgd_leaf_bytes(100, 7, None) == 50 + 4
    # Buckets of 30: 4 rows of 30 (20 coordinates of padding in the last) and 4 norms.
    assert comm.qsgd_leaf_bytes(100, 7, 30) == 120 // 2 + 4 * 4
    assert comm.qsgd_bytes(tree, 7) == (50 + 4) + (2 + 4)  # b's 3 levels round up to 2 bytes
    # s = 15 travels as int8: 8 bits per coordinate, not QSGD's 5.
    assert comm.qsgd_bytes(tree, 15) == (100 + 4) + (3 + 4)
    # Buckets of 50: 2 rows for a, one row of 3 for b; int8 at s = 127, int16 above.
    assert comm.qsgd_bytes(tree, 127, 50) == (100 + 2 * 4) + (3 + 4)
    assert comm.qsgd_bytes(tree, 300, 50) == (200 + 2 * 4) + (6 + 4)


def test_tree_pmean_skips_integer_leaves_and_variance_is_exact():
    x = np.random.default_rng(5).normal(size=(N, 4)).astype(np.float32) * 1e3 + 1e4
    tree = {"x": x, "count": np.full((N,), 7, np.int32)}

    def f(t):
        avg = C.tree_pmean(t, "i")
        return avg, jax.lax.pmean(C.squared_distance({"x": t["x"]}, {"x": avg["x"]}), "i")

    avg, var = jax.pmap(f, axis_name="i")(tree)
    np.testing.assert_array_equal(avg["count"], 7)
    np.testing.assert_allclose(avg["x"][0], x.astype(np.float64).mean(axis=0), rtol=1e-6)
    x64 = x.astype(np.float64)
    expected = np.mean(np.sum((x64 - x64.mean(axis=0)) ** 2, axis=1))
    np.testing.assert_allclose(var, expected, rtol=1e-5)  # large offset: no cancellation
