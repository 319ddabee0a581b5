"""Collectives over a named axis: tree means, replica variance, QSGD.

All functions run inside ``jax.pmap`` or ``jax.shard_map`` over ``axis_name``.
Only floating-point leaves are reduced; integer leaves (optimizer step
counts, for example) are identical on every replica and pass through.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from adpsgd_jax import comm


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def float_leaves(tree: Any) -> list:
    """The floating-point leaves of ``tree`` (the ones that are communicated)."""
    return [x for x in jax.tree.leaves(tree) if _is_float(x)]


def tree_pmean(tree: Any, axis_name) -> Any:
    """Mean over ``axis_name`` (a name or a tuple of names) of every floating
    leaf: xbar = (1/N) sum_i x_i."""
    return jax.tree.map(lambda x: lax.pmean(x, axis_name) if _is_float(x) else x, tree)


def squared_distance(tree: Any, center: Any) -> jnp.ndarray:
    """d_i = sum over leaves of ||x_i - c||^2, accumulated in float32. Returns float32[].

    With c = xbar, the workers' mean of d_i is the parameter variance
    V = (1/N) sum_i ||x_i - xbar||^2 (docs/algorithm.md, "Parameter variance"):
    computed from the distance to the already-known mean, never as
    E[x^2] - E[x]^2, which cancels in float32. The step fuses that mean with
    the loss's into one scalar-pair all-reduce.
    """
    parts = [
        jnp.sum(jnp.square(x.astype(jnp.float32) - c.astype(jnp.float32)))
        for x, c in zip(float_leaves(tree), float_leaves(center))
    ]
    return sum(parts, jnp.zeros((), jnp.float32))


def _vdot(xs: list, ys: list) -> jnp.ndarray:
    """sum_k <xs[k], ys[k]> over two lists of arrays, accumulated in float32. Returns float32[]."""
    parts = [jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in zip(xs, ys)]
    return sum(parts, jnp.zeros((), jnp.float32))


def _differences(tree: Any, other: Any) -> list:
    """tree - other over the floating leaves, in float32, in leaf order."""
    return [x.astype(jnp.float32) - y.astype(jnp.float32) for x, y in zip(float_leaves(tree), float_leaves(other))]


def unit_direction(new: Any, old: Any) -> tuple:
    """(u, ||u||): u = (new - old) / ||new - old|| over the floating leaves, in
    their dtypes (zeros when new = old; integer leaves zeros), and the float32
    norm of u as stored, which differs from 1 by its dtype's rounding."""
    diffs = _differences(new, old)
    norm = jnp.sqrt(_vdot(diffs, diffs))
    inverse = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    u = jax.tree.map(lambda x, y: ((x.astype(jnp.float32) - y.astype(jnp.float32)) * inverse).astype(x.dtype)
                     if _is_float(x) else jnp.zeros_like(x), new, old)
    stored = float_leaves(u)
    return u, jnp.sqrt(_vdot(stored, stored))


def variance_bound(tree: Any, anchor: Any, direction: Any, direction_norm: jnp.ndarray, axis_name) -> jnp.ndarray:
    """An upper bound of the variance from one all-reduce of a float32 pair
    (docs/algorithm.md, "variance_trigger"). Returns float32[], the same on every worker.

    With Delta_i = x_i - x_s (``tree`` minus ``anchor``) and u = ``direction``
    (None: no direction), each worker sends ``(||Delta_i||^2, <Delta_i, u> / ||u||)``
    and, since ``||mean_i Delta_i|| >= |<mean_i Delta_i, u>| / ||u||``,
    ::

        B = mean_i ||Delta_i||^2 - (mean_i <Delta_i, u> / ||u||)^2
          >= mean_i ||Delta_i||^2 - ||mean_i Delta_i||^2 = V.

    Dividing by the stored u's own norm keeps the inequality exact however u
    was rounded to its dtype.
    """
    sq = squared_distance(tree, anchor)
    dot = jnp.zeros((), jnp.float32)
    if direction is not None:
        projection = _vdot(_differences(tree, anchor), float_leaves(direction))
        dot = jnp.where(direction_norm > 0, projection / jnp.where(direction_norm > 0, direction_norm, 1.0), 0.0)
    mean_sq, mean_dot = lax.pmean(jnp.stack([sq, dot]), axis_name)
    return mean_sq - jnp.square(mean_dot)


def _buckets(v: jnp.ndarray, bucket_size: Optional[int]) -> jnp.ndarray:
    """Flatten ``v`` into [num_buckets, bucket] rows, zero-padding the last."""
    flat = v.reshape(-1).astype(jnp.float32)
    rows, width = comm.qsgd_buckets(flat.shape[0], bucket_size)
    return jnp.pad(flat, (0, rows * width - flat.shape[0])).reshape(rows, width)


def qsgd_quantize(v: jnp.ndarray, key: jax.Array, levels: int, bucket_size: Optional[int] = None):
    """Stochastic s-level quantisation of one gradient leaf (docs/algorithm.md, "Strategies", qsgd).

    Per bucket of ``bucket_size`` coordinates (the whole leaf when None):
    ``Q(v)_j = ||v||_2 * sign(v_j) * xi_j / s``, with ``xi_j = floor(s |v_j| / ||v|| + u_j)``,
    ``u_j ~ U[0, 1)``, so that E[Q(v)] = v and xi_j is in {0, ..., s}.

    Args:
      v: gradient leaf of any shape with n coordinates.
      key: PRNG key.
      levels: s >= 1.
    Returns:
      A pair ``(signed_levels, norms)``: int8 (s <= 127) or int16 [rows, bucket] holding
      sign(v_j) * xi_j, and float32 [rows] bucket norms.
    """
    rows = _buckets(v, bucket_size)
    norms = jnp.sqrt(jnp.sum(jnp.square(rows), axis=1))
    safe = jnp.where(norms > 0, norms, 1.0)[:, None]
    scaled = levels * jnp.abs(rows) / safe
    xi = jnp.floor(scaled + jax.random.uniform(key, rows.shape))
    xi = jnp.minimum(xi, levels)  # u < 1 makes this a no-op; guard against rounding.
    dtype = jnp.int8 if levels <= comm.INT8_MAX_LEVELS else jnp.int16
    return (jnp.sign(rows) * xi).astype(dtype), norms


def qsgd_dequantize(signed_levels: jnp.ndarray, norms: jnp.ndarray, levels: int, shape) -> jnp.ndarray:
    """Inverse of ``qsgd_quantize``: norms * signed_levels / s, reshaped to ``shape``.

    Accepts leading batch axes: [..., rows, bucket] levels with [..., rows] norms.
    """
    values = signed_levels.astype(jnp.float32) * (norms[..., None] / levels)
    size = 1
    for d in shape:
        size *= d
    lead = values.shape[:-2]
    return values.reshape(*lead, -1)[..., :size].reshape(*lead, *shape)


def qsgd_pack(signed_levels: jnp.ndarray, levels: int) -> jnp.ndarray:
    """The wire form of ``qsgd_quantize``'s levels: a 1-D array of
    ``comm.qsgd_level_bits(levels)`` bits per level, padding included.

    s <= 7: levels l_j in [-7, 7] become nibbles l_j + 7 in 0..14, two per
    uint8 (byte k = n_2k | n_(2k+1) << 4; an odd count gets one zero-level
    nibble); ceil(n / 2) bytes for n levels. Larger s: the int8 / int16
    levels themselves, flattened.
    """
    flat = signed_levels.reshape(-1)
    if levels > comm.NIBBLE_MAX_LEVELS:
        return flat
    nibbles = (jnp.pad(flat, (0, flat.shape[0] % 2)) + comm.NIBBLE_MAX_LEVELS).astype(jnp.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def qsgd_unpack(wire: jnp.ndarray, levels: int, shape) -> jnp.ndarray:
    """Inverse of ``qsgd_pack``: [..., wire bytes] -> signed levels ``[..., *shape]``
    (int8 for s <= 127, int16 above), leading axes kept."""
    lead, count = wire.shape[:-1], math.prod(shape)
    if levels > comm.NIBBLE_MAX_LEVELS:
        return wire.reshape(*lead, *shape)
    low, high = wire & 0xF, wire >> 4
    nibbles = jnp.stack([low, high], axis=-1).reshape(*lead, -1)[..., :count]
    return (nibbles.astype(jnp.int8) - comm.NIBBLE_MAX_LEVELS).reshape(*lead, *shape)


def all_gather(x: jnp.ndarray, axis_name) -> jnp.ndarray:
    """Every worker's ``x``, stacked in worker order: [...] -> [N, ...].

    ``axis_name`` is a name or a tuple of names (major to minor). The axes
    are gathered one at a time from the minor end, which works for vmapped
    worker axes too (a tuple mixing them with mesh axes does not).
    """
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    for name in reversed(names):
        x = lax.all_gather(x, name)
    return x.reshape((-1,) + x.shape[len(names):])


def qsgd_mean(grads: Any, key: jax.Array, levels: int, axis_name, bucket_size: Optional[int] = None) -> Any:
    """Mean over ``axis_name`` of every worker's quantised gradient.

    Each worker quantises its floating leaves, the signed levels in their
    wire form (``qsgd_pack``: 4-bit nibbles for s <= 7, int8, int16) and the
    float32 norms are all-gathered, and every worker unpacks, dequantises and
    averages the N messages: (1/N) sum_i Q(g_i). What is gathered is what
    ``comm.qsgd_bytes`` counts. Quantised values cannot be summed in a ring,
    hence the all-gather (``timemodel.allgather_time`` models its cost).
    """
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    out = []
    for leaf, k in zip(leaves, keys):
        if not _is_float(leaf) or leaf.size == 0:
            out.append(leaf)
            continue
        q, norms = qsgd_quantize(leaf, k, levels, bucket_size)
        q_all = qsgd_unpack(all_gather(qsgd_pack(q, levels), axis_name), levels, q.shape)  # [N, rows, bucket]
        norms_all = all_gather(norms, axis_name)  # [N, rows]
        mean = jnp.mean(qsgd_dequantize(q_all, norms_all, levels, leaf.shape), axis=0)
        out.append(mean.astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)
