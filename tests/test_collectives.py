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


def test_qsgd_mean_is_mean_of_workers_dequantised_messages():
    g = jnp.asarray(np.random.default_rng(3).normal(size=(N, 33)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(4), N)
    mean = jax.pmap(lambda x, k: C.qsgd_mean({"g": x}, k, 15, "i", bucket_size=8), axis_name="i")(g, keys)
    leaf_keys = [jax.random.split(keys[i], 1)[0] for i in range(N)]  # one key per leaf
    each = [C.qsgd_dequantize(*C.qsgd_quantize(g[i], leaf_keys[i], 15, 8), 15, (33,)) for i in range(N)]
    np.testing.assert_allclose(mean["g"], np.broadcast_to(np.mean(each, axis=0), (N, 33)), rtol=1e-5, atol=1e-6)


def test_qsgd_bytes_formula():
    tree = {"a": jax.ShapeDtypeStruct((10, 10), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    # s = 15: 1 sign + 4 level bits per coordinate; 32 bits per bucket norm.
    assert comm.qsgd_leaf_bits(100, 15, None) == 32 + 100 * 5
    assert comm.qsgd_leaf_bits(100, 15, 30) == 4 * 32 + 100 * 5
    assert comm.qsgd_bytes(tree, 15) == math.ceil((32 + 500) / 8) + math.ceil((32 + 15) / 8)
    # s = 127 is one byte per coordinate: 4x smaller than float32 plus the norms.
    assert comm.qsgd_bytes(tree, 127, 50) == (2 * 32 + 800) // 8 + (32 + 24) // 8


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
