"""The parameter tree cut into P fragments for streaming averaging
(docs/algorithm.md, "Streaming averaging").

A partition is a tuple with one fragment index in [0, P) per leaf of the
parameters, in ``jax.tree.leaves`` order. It is either the default one,
``contiguous(bytes_per_leaf, P)``, or the user's: a pytree of ints with the
parameters' structure (``assign``). Everything here is host-side Python on
shapes and dtypes; nothing is traced.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def _float_size(x) -> int:
    """Elements of a floating-point leaf (the ones averaged); 0 for any other dtype."""
    return int(np.prod(x.shape)) if np.issubdtype(np.dtype(x.dtype), np.floating) else 0


def contiguous(leaf_bytes: Sequence[int], count: int) -> tuple:
    """The default partition: P = ``count`` contiguous non-empty groups of leaves, balanced by bytes.

    With b_j the bytes of leaf j (n leaves), B = sum_j b_j and S_j = b_0 + ... +
    b_{j-1} the bytes before leaf j (S_0 = 0, S_n = B), cut k = 1, ..., P - 1 is
    the boundary c_k minimising abs(S_c - k B / P) (the smallest c on a tie) over
    c_{k-1} < c <= n - (P - k) (c_0 = 0), so every group keeps at least one
    leaf; fragment p holds leaves c_p, ..., c_{p+1} - 1 (c_P = n).
    Returns a tuple of n ints. ValueError when P > n.
    """
    n = len(leaf_bytes)
    if count > n:
        raise ValueError(f"fragments={count} needs at least {count} parameter leaves, the model has {n}: "
                         f"give fragments <= {n}")
    before = np.concatenate([[0], np.cumsum(np.asarray(leaf_bytes, np.int64))])
    total, cuts = int(before[-1]), [0]
    for k in range(1, count):
        candidates = np.arange(cuts[-1] + 1, n - (count - k) + 1)
        gaps = np.abs(before[candidates] * count - k * total)  # |S_c - k B / P| times P, in integers
        cuts.append(int(candidates[int(np.argmin(gaps))]))
    cuts.append(n)
    return tuple(p for p in range(count) for _ in range(cuts[p + 1] - cuts[p]))


def check_user_partition(partition: Any) -> int:
    """P of a user's partition (a pytree of ints >= 0, every index 0 .. P-1 used), checked without the parameters."""
    indices = jax.tree.leaves(partition)
    if not indices or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0
                              for i in indices):
        raise ValueError("fragments must be an integer P >= 1 or a pytree of fragment indices (ints >= 0) with "
                         f"the parameters' structure, got {partition!r}")
    count = int(max(indices)) + 1
    missing = sorted(set(range(count)) - {int(i) for i in indices})
    if missing:
        raise ValueError(f"fragments: a partition into P={count} fragments must use every index 0 .. {count - 1}; "
                         f"missing {missing}")
    return count


def assign(params: Any, partition: Any, count: int) -> tuple:
    """The fragment of each leaf of ``params`` (arrays or ShapeDtypeStructs), in ``jax.tree.leaves`` order.

    ``partition`` None: ``contiguous`` over the leaves' floating-point bytes;
    else the user's tree of ints, which must have ``params``' structure. Every
    fragment must hold at least one floating-point element (ValueError).
    """
    leaves, treedef = jax.tree.flatten(params)
    if partition is None:
        index = contiguous([_float_size(x) * np.dtype(x.dtype).itemsize for x in leaves], count)
    else:
        user, user_def = jax.tree.flatten(partition)
        if user_def != treedef:
            raise ValueError(f"fragments: the partition's structure {user_def} differs from the parameters' "
                             f"{treedef}; give one int per parameter leaf")
        index = tuple(int(i) for i in user)
    sizes = sizes_of(leaves, index, count)
    empty = [p for p in range(count) if sizes[p] == 0]
    if empty:
        raise ValueError(f"fragments: fragment(s) {empty} of {count} hold no floating-point parameter; "
                         f"give fewer fragments or another partition")
    return index


def sizes_of(leaves: Sequence, index: Sequence[int], count: int) -> tuple:
    """d_p: the floating-point elements of each fragment p (a tuple of P ints)."""
    sizes = [0] * count
    for x, p in zip(leaves, index):
        sizes[p] += _float_size(x)
    return tuple(sizes)


def members(index: Sequence[int], count: int) -> tuple:
    """The leaf positions of each fragment: a tuple of P tuples of ints."""
    return tuple(tuple(j for j, p in enumerate(index) if p == q) for q in range(count))
