"""Many workers per device: N = 8 workers on 8, 4, 2 and 1 of the 8 virtual
CPU devices give the same run as one worker per device.

Model and data are test_step's per-worker linear regression. K = N / D
workers share a device on a vmapped named axis; the sync gate stays one
scalar per device program.
"""

import chex
import jax
import numpy as np
import optax
import pytest

import adpsgd_jax as A
from adpsgd_jax import comm, distributed as D, loops, schedules as S
from helpers import BATCH, N, SCHEDULES, Data, assert_all_reduces_inside_conditionals, init_params, loss_fn, replicas

T = 24
LR = optax.piecewise_constant_schedule(0.05, {T // 2: 0.1})


def layout_run(num_devices, build, steps=T, group_size=1, loop=loops.VMAP):
    """``steps`` steps of ``build(layout)`` with N workers on ``num_devices`` devices, run by ``loop``."""
    layout = D.workers(N, jax.devices()[:num_devices], group_size=group_size, loop=loop)
    strategy = build(layout)
    params, model_state = init_params()
    state = D.replicate(strategy.init(params, model_state, jax.random.PRNGKey(0)), layout)
    step, data, synced = D.shard_map_step(strategy.step, layout), Data(), []
    for _ in range(steps):
        state, metrics = step(state, D.shard_batch(data.batch(), layout))
        synced.append(bool(metrics.synced[0]))
    return state, synced


def assert_same_run(a, b):
    (sa, ha), (sb, hb) = a, b
    chex.assert_trees_all_close(sa.params, sb.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(sa.model_state, sb.model_state, rtol=1e-5, atol=1e-6)
    assert ha == hb
    assert int(sa.comm.rounds[0]) == int(sb.comm.rounds[0])
    assert comm.total_bytes(sa.comm) == comm.total_bytes(sb.comm)
    assert comm.total_bytes(sa.group_comm) == comm.total_bytes(sb.group_comm)


def flat(name):
    opt = optax.sgd(LR, momentum=0.9)
    if name == "allreduce":
        return lambda layout: A.allreduce(loss_fn, opt, workers=layout)
    if name == "qsgd":
        return lambda layout: A.qsgd(loss_fn, opt, levels=7, bucket_size=4, workers=layout)
    return lambda layout: A.local_sgd(loss_fn, opt, SCHEDULES[name](T, LR), workers=layout)


@pytest.mark.parametrize("name", sorted(SCHEDULES) + ["allreduce", "qsgd"])
def test_every_strategy_is_the_same_on_8_4_2_and_1_devices(name):
    reference = layout_run(8, flat(name))
    assert sum(reference[1]) > 0
    for devices in (4, 2, 1):  # (QSGD draws from the same per-worker keys wherever a worker runs)
        assert_same_run(layout_run(devices, flat(name)), reference)
    # The other worker loops: one worker at a time on 2 devices, unrolled on 4, in chunks of 3 on 1.
    assert_same_run(layout_run(2, flat(name), loop=loops.MAP), reference)
    assert_same_run(layout_run(4, flat(name), loop=loops.UNROLL), reference)
    assert_same_run(layout_run(1, flat(name), loop=loops.chunks(3)), reference)


def grouped(outer=None):
    opt = optax.sgd(LR, momentum=0.9)
    return lambda layout: A.local_sgd(loss_fn, opt, S.adpsgd(T, 3, lr_schedule=LR), workers=layout,
                                      outer_optimizer=outer)


@pytest.mark.parametrize("group_size", [2, 4])
def test_two_level_groups_are_the_same_on_8_4_2_and_1_devices(group_size):
    # Groups of 2 on 4 devices span one device; on 1 device, 4 groups share it.
    reference = layout_run(8, grouped(), group_size=group_size)
    for devices in (4, 2, 1):
        assert_same_run(layout_run(devices, grouped(), group_size=group_size), reference)
    for loop in (loops.MAP, loops.UNROLL, loops.chunks(3)):  # on one device: 8 // group_size groups of group_size workers, nested axes
        assert_same_run(layout_run(1, grouped(), group_size=group_size, loop=loop), reference)
    state = reference[0]
    for g in range(N // group_size):  # replicas identical inside every group
        chex.assert_trees_all_equal(*replicas(state.params)[g * group_size:(g + 1) * group_size])


def test_outer_optimizer_is_the_same_on_8_and_1_devices():
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    assert_same_run(layout_run(1, grouped(outer)), layout_run(8, grouped(outer)))
    assert_same_run(layout_run(2, grouped(outer), group_size=2), layout_run(8, grouped(outer), group_size=2))


def test_workers_on_one_device_differ_between_syncs_and_agree_after():
    layout = D.workers(N, jax.devices()[:1])
    built = A.local_sgd(loss_fn, optax.sgd(0.05), S.constant(3), workers=layout)
    state = D.replicate(built.init(*init_params(), jax.random.PRNGKey(0)), layout)
    step, data = D.shard_map_step(built.step, layout), Data()
    for t in range(6):
        state, metrics = step(state, D.shard_batch(data.batch(), layout))
        copies = replicas(state.params)
        if (t + 1) % 3:
            assert not np.allclose(copies[0]["w"], copies[1]["w"])
        else:
            chex.assert_trees_all_equal(*copies)
            assert metrics.variance[0] > 0


def test_the_all_reduce_sits_inside_the_conditional():
    # The parameter mean is an all-reduce across devices, inside the cond's branch.
    assert_all_reduces_inside_conditionals(S.constant(4))


def test_layout_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"num_workers must be a positive multiple of the number of devices \(3\)"):
        D.workers(8, jax.devices()[:3])
    with pytest.raises(ValueError, match=r"group_size must be .* divides the number of workers \(8\), got 3"):
        D.workers(8, jax.devices()[:2], group_size=3)
    with pytest.raises(ValueError, match=r"group_size 6 and the 4 workers per device.*accepted group sizes: 1, 2, 4, 12"):
        D.workers(12, jax.devices()[:3], group_size=6)
    for bad in ("map", 3, loops.chunks(5), ("vmap",)):
        with pytest.raises(ValueError, match=r"loop must be loops.VMAP, loops.MAP, loops.UNROLL or loops.chunks\(B\) "
                                             r"with B in \[1, 4\]"):
            D.workers(8, jax.devices()[:2], loop=bad)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"chunks takes a chunk size >= 1"):
            loops.chunks(bad)
    assert D.workers(8, jax.devices()[:2], loop=loops.chunks(1)).loop == loops.MAP
    assert D.workers(8, jax.devices()[:2], loop=loops.chunks(4)).loop == loops.VMAP
    assert D.workers(8, jax.devices(), loop=loops.MAP).loop == loops.VMAP  # one worker per device: nothing to loop over


def test_batch_rows_are_workers_in_order():
    layout = D.workers(16, jax.devices()[:4])
    assert layout.workers_per_device == 4 and layout.num_workers == 16
    x = np.arange(16 * BATCH, dtype=np.float32).reshape(16, BATCH)
    placed = D.shard_batch({"x": x}, layout)
    for shard in placed["x"].addressable_shards:  # device d holds workers 4d .. 4d + 3
        d = list(layout.mesh.devices.flat).index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), x[4 * d:4 * d + 4])
    assert D.local_workers(layout) == list(range(16))
