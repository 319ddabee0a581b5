"""What the strategy tests share: a per-worker linear regression on 8 workers,
the library's strategies built on it, runs of a few steps, the schedules of
every kind, and the meshes and the ``jax.pmap`` wrapper the tests run under.

The model is linear regression with a per-worker target, y = x . w_i + noise,
w_i = w* + drift * delta_i: each worker's data pulls its replica elsewhere,
so the parameter variance is real and grows with the period.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import adpsgd_jax as A
from adpsgd_jax import distributed as D, schedules as S

N, DIM, BATCH = 8, 6, 4


def loss_fn(params, model_state, batch, rng):
    del rng
    pred = batch["x"] @ params["w"] + params["b"]
    err = pred - batch["y"]
    # A model state that changes every step (running mean of the targets)
    # exercises model-state averaging.
    new_state = {"y_mean": 0.9 * model_state["y_mean"] + 0.1 * jnp.mean(batch["y"])}
    return 0.5 * jnp.mean(err**2), (new_state, {"abs_err": jnp.mean(jnp.abs(err))})


def init_params():
    return {"w": jnp.zeros((DIM,), jnp.float32), "b": jnp.zeros((), jnp.float32)}, {"y_mean": jnp.zeros(())}


class Data:
    """Deterministic per-worker regression batches [N, BATCH, ...]."""

    def __init__(self, seed=0, drift=0.5):
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=DIM) + drift * rng.normal(size=(N, DIM))
        self.rng = rng

    def batch(self):
        x = self.rng.normal(size=(N, BATCH, DIM)).astype(np.float32)
        y = np.einsum("nbd,nd->nb", x, self.w) + 0.3 * self.rng.normal(size=(N, BATCH))
        return {"x": x, "y": y.astype(np.float32)}


def pmap_step(step, mesh: Mesh, donate_state: bool = True):
    """``jax.pmap`` of a per-worker ``step(state, batch)`` over a 1-D mesh's axis: the second way,
    beside ``distributed.shard_map_step``, that the tests run a strategy's step."""
    assert mesh.devices.ndim == 1, mesh.axis_names
    devices = list(mesh.devices.flat)
    return jax.pmap(step, axis_name=mesh.axis_names[0], devices=devices, donate_argnums=(0,) if donate_state else ())


def strategy_for(optimizer, schedule=None, strategy="average", outer=None, qsgd_levels=127, qsgd_bucket_size=None,
                 axis_name="batch", **kw):
    """The library strategy named ``strategy`` on test_step's regression."""
    if strategy == "allreduce":
        return A.allreduce(loss_fn, optimizer, axis_name=axis_name)
    if strategy == "qsgd":
        return A.qsgd(loss_fn, optimizer, levels=qsgd_levels, bucket_size=qsgd_bucket_size, axis_name=axis_name)
    assert strategy == "average", strategy
    return A.local_sgd(loss_fn, optimizer, schedule, axis_name=axis_name, outer_optimizer=outer, **kw)


def start(where, strategy, seed=0):
    params, model_state = init_params()
    return D.replicate(strategy.init(params, model_state, jax.random.PRNGKey(seed)), where)


def run(where, optimizer, schedule, steps, strategy="average", data=None, wrap=pmap_step, outer=None, **kw):
    """``steps`` steps from init_params on Data(); ``outer`` is the outer optimizer, ``kw`` go to the strategy."""
    data = data or Data()
    built = strategy_for(optimizer, schedule, strategy, outer=outer, **kw)
    state = start(where, built)
    step = wrap(built.step, where)
    history = []
    for _ in range(steps):
        state, metrics = step(state, D.shard_batch(data.batch(), where))
        history.append(jax.tree.map(np.asarray, metrics))
    return state, history


def replicas(tree):
    return [jax.tree.map(lambda x: np.asarray(x)[i], tree) for i in range(N)]


SCHEDULES = {
    "every_step": lambda T, lr: S.every_step(),
    "constant": lambda T, lr: S.constant(3),
    "post_local": lambda T, lr: S.post_local(5, 3),
    "stagewise": lambda T, lr: S.stagewise(2, [T // 2], 2.0),
    "adacomm": lambda T, lr: S.adacomm(6, 10),
    "adpsgd": lambda T, lr: S.adpsgd(T, 3, lr_schedule=lr),
    "lr_proportional": lambda T, lr: S.lr_proportional(T, 3, lr_schedule=lr),
    "qsr": lambda T, lr: S.qsr(T, 3, lr_schedule=lr),
    "variance_trigger": lambda T, lr: S.variance_trigger(T, 3, lr_schedule=lr),
}


def traced_run(where, optimizer, schedule, steps, wrap=pmap_step, outer=None, strategy="average", **kw):
    """Run ``steps`` steps through a trace counter; returns (number of traces, the period of each step)."""
    traces = []
    chex.clear_trace_counter()  # chex keys its counter by function hash, shared across parametrizations
    built = strategy_for(optimizer, schedule, strategy, outer=outer, **kw)

    def counted(state, batch):
        traces.append(1)
        return built.step(state, batch)

    state = start(where, built)
    step = wrap(chex.assert_max_traces(counted, n=1), where)
    data, periods = Data(), []
    for _ in range(steps):
        state, metrics = step(state, D.shard_batch(data.batch(), where))
        periods.append(int(metrics.period[0]))
    return len(traces), periods


def flat_mesh(axis_name: str = "batch") -> Mesh:
    """The 1-D mesh of every device, one worker each."""
    return D.workers(axis_name=axis_name).mesh


def two_level_mesh(group_size: int) -> Mesh:
    """The 2-D mesh [G, L] ("group", "local") of the 8 devices, one worker each: G = N / L groups of
    L = ``group_size`` consecutive workers (L = 1 too, unlike ``distributed.workers``, which lays
    groups of one out flat)."""
    return Mesh(np.asarray(jax.devices()).reshape(N // group_size, group_size), ("group", "local"))


def assert_all_reduces_inside_conditionals(schedule, **kw):
    """With 4 workers on each of 2 devices, every all-reduce of ``local_sgd``'s compiled
    step (``kw`` go to it) is inside a conditional's branch (a batched predicate would
    have turned the cond into a select that all-reduces every step)."""
    layout = D.workers(N, jax.devices()[:2])
    built = A.local_sgd(loss_fn, optax.sgd(0.05), schedule, workers=layout, **kw)
    state = D.replicate(built.init(*init_params(), jax.random.PRNGKey(0)), layout)
    batch = D.shard_batch(Data().batch(), layout)
    hlo = D.shard_map_step(built.step, layout).compiled.lower(state, batch).compile().as_text()
    assert "conditional" in hlo
    branches = re.findall(r"branch_computations=\{([^}]*)\}", hlo) + re.findall(
        r"(?:true|false)_computation=([\w.\-]+)", hlo)
    assert branches, "no conditional with branches in the compiled program"
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[:entry.index("\n}\n")]
    assert "all-reduce" not in entry, "an all-reduce runs outside the conditional, on every step"
    assert hlo.count("all-reduce(") + hlo.count("all-reduce-start(") >= 1
    return hlo


def simulate(schedule, total_steps, lr=None, alpha=1.0, saturation=None, loss_fn=None):
    """Run ``schedule`` for ``total_steps``; return (synced[T], period[T]) as numpy.

    ``synced`` marks parameter averages only. An allreduce (warm-up) step keeps
    the replicas identical, so the variance restarts after it.
    """
    lr = lr or (lambda s: 1.0)

    def body(carry, step):
        state, last = carry
        if schedule.allreduce_step is not None:
            last = jnp.where(schedule.allreduce_step(state, step), step + 1, last)
        sync = schedule.should_sync(state, step)
        tau = (step + 1 - last).astype(jnp.float32)
        variance = lr(step) ** 2 * tau**alpha
        if saturation is not None:
            variance = saturation * variance / (saturation + variance)
        loss = loss_fn(step) if loss_fn else jnp.float32(1.0)
        state, last = jax.lax.cond(
            sync,
            lambda: (schedule.update(state, step, jnp.float32(variance), jnp.float32(loss)), step + 1),
            lambda: (state, last),
        )
        return (state, last), (sync, state.period)

    run = jax.jit(lambda: jax.lax.scan(body, (schedule.init(), jnp.int32(0)), jnp.arange(total_steps))[1])
    synced, period = run()
    return np.asarray(synced), np.asarray(period)

