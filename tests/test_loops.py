"""Worker loops (``adpsgd_jax.loops``) and what the gated step compiles to.

Every loop gives the run of one worker per device on a convolutional model;
"map" and "unroll" leave no grouped convolution in the program, "vmap" does.
The gated step's local branch moves no more memory than the same step
compiled with no gate and no collective (the count of ``bench.hlo``), for one
worker per device and for several vmapped, mapped or unrolled workers.
(test_workers.py runs every strategy and two-level layout under each loop.)
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adpsgd_jax as A
from adpsgd_jax import comm, distributed as D, loops, schedules as S
from experiments.bench import hlo, references, steps

K = 4


@pytest.fixture(scope="module")
def cnn_task():
    return references.image_task("cnn", 2, K)


def run(task, layout, steps_=3):
    """``steps_`` steps of CPSGD (period 2) on ``layout`` from the task's variables: the final state and
    the counts of the compiled step (``hlo.program_counts``)."""
    _, params, model_state, loss_fn, optimizer, batch, _ = task
    strategy = A.local_sgd(loss_fn, optimizer, S.constant(2), workers=layout)
    step, state, b = steps.built(layout, strategy, params, model_state, batch)
    counts = hlo.program_counts(step.compiled.lower(state, b).compile())
    for _ in range(steps_):
        state, _ = step(state, b)
    return state, counts


def test_every_loop_gives_one_worker_per_device_on_a_cnn_and_only_vmap_groups_convolutions(cnn_task):
    reference, counts = run(cnn_task, D.workers(K, jax.devices()[:K]))
    assert counts["grouped_convolutions"] == 0
    for loop in (loops.VMAP, loops.MAP, loops.UNROLL, loops.chunks(3)):
        state, counts = run(cnn_task, D.workers(K, jax.devices()[:1], loop=loop))
        chex.assert_trees_all_close(state.params, reference.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(state.model_state, reference.model_state, rtol=1e-5, atol=1e-6)
        # vmap (and each vmapped chunk of 3) groups the workers' convolutions; map and unroll do not.
        assert (counts["grouped_convolutions"] > 0) == (loop.name in ("vmap", "3")), (loop, hlo.dumps(counts))


def compiled_counts(task, layout, step_fn=None):
    _, params, model_state, loss_fn, optimizer, batch, _ = task
    strategy = A.local_sgd(loss_fn, optimizer, S.constant(10**9), workers=layout)
    step, state, b = steps.built(layout, strategy, params, model_state, {k: v[:layout.num_workers]
                                                                          for k, v in batch.items()}, step_fn)
    return hlo.program_counts(step.compiled.lower(state, b).compile())


@pytest.mark.parametrize("k,loop", [(1, loops.VMAP), (K, loops.VMAP), (K, loops.MAP), (K, loops.UNROLL)],
                         ids=["1-vmap", "K-vmap", "K-map", "K-unroll"])
def test_the_gated_local_step_moves_what_the_step_without_gate_moves(k, loop):
    # The MLP: before ``averaging._over`` its local branch copied every parameter each step.
    task = references.image_task("mlp", 8, 8)
    layout = D.workers(8, jax.devices()[:8 // k], loop=loop)
    gated = compiled_counts(task, layout)
    plain = compiled_counts(task, layout, references.local_only_step(task[3], task[4], layout.loop))
    verdict = hlo.count_ratio(gated, plain, comm.tree_bytes(task[1]))
    assert verdict["verdict"] == "met", (verdict, hlo.dumps(gated), hlo.dumps(plain))
    assert gated["collectives"] == 0 == plain["collectives"]


@pytest.mark.parametrize("options", [dict(outer_optimizer=optax.sgd(0.7, momentum=0.9, nesterov=True)),
                                     dict(average_opt_state=True), dict(schedule="adpsgd"),
                                     dict(fragments=4, fragment_delay=2, fragment_alpha=0.5)])
def test_no_parameter_copy_with_an_outer_optimizer_averaged_optimizer_state_adpsgd_or_fragments(options):
    task = references.image_task("mlp", 8, 8)
    _, params, model_state, loss_fn, optimizer, batch, _ = task
    layout = D.workers(8, jax.devices()[:2])
    options = dict(options)
    lr = optax.piecewise_constant_schedule(0.1, {5000: 0.01})  # a run's table of rates (a literal in the program)
    schedule = S.adpsgd(10**4, 10**3, lr_schedule=lr) if options.pop("schedule", None) else S.constant(10**9)
    strategy = A.local_sgd(loss_fn, optimizer, schedule, workers=layout, **options)
    counts = {}
    for name, step_fn in (("gated", None), ("plain", references.local_only_step(loss_fn, optimizer))):
        step, state, b = steps.built(layout, strategy, params, model_state, batch, step_fn)
        counts[name] = hlo.program_counts(step.compiled.lower(state, b).compile())
    assert hlo.count_ratio(counts["gated"], counts["plain"], comm.tree_bytes(params))["verdict"] == "met", counts


def test_auto_picks_by_convolution_and_platform(cnn_task):
    _, params, model_state, loss_fn, _, batch, _ = cnn_task
    one = ({k: v[0] for k, v in batch.items()},)
    assert loops.choose(loss_fn, params, model_state, *one, jax.random.PRNGKey(0)) == loops.UNROLL
    assert loops.choose(loss_fn, params, model_state, *one, jax.random.PRNGKey(0), platform="gpu") == loops.MAP
    mlp = references.image_task("mlp", 2, 1)
    assert loops.choose(mlp[3], mlp[1], mlp[2], {k: v[0] for k, v in mlp[5].items()}, jax.random.PRNGKey(0)) == loops.VMAP


@pytest.mark.parametrize("loop", [loops.MAP, loops.UNROLL, loops.chunks(2)], ids=["map", "unroll", "chunks2"])
def test_looped_passes_unbatched_arguments_and_nests(loop):
    def f(x, w):
        return {"y": jnp.tanh(x @ w), "s": jnp.sum(x)}

    x, w = jnp.arange(3 * 2 * 5, dtype=jnp.float32).reshape(3, 2, 5) / 10, jnp.ones((5, 4))
    g = loops.looped(f, loop)
    chex.assert_trees_all_close(jax.vmap(g, in_axes=(0, None))(x, w), jax.vmap(f, in_axes=(0, None))(x, w))
    chex.assert_trees_all_close(jax.vmap(jax.vmap(g, in_axes=(0, None)), in_axes=(0, None))(x[None], w),
                                jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(0, None))(x[None], w))
    chex.assert_trees_all_equal(g(x[0], w), f(x[0], w))  # called plainly: fn itself


def test_hlo_shape_bytes_and_slices():
    assert hlo.shape_bytes("(f32[8,128]{1,0}, s32[], pred[3])") == 8 * 128 * 4 + 4 + 3
    text = """HloModule m

%fused (p0: f32[8,100], p1: f32[100], p2: s32[]) -> f32[8,100] {
  %p0 = f32[8,100]{1,0} parameter(0)
  %p1 = f32[100]{0} parameter(1)
  %b = f32[1,100]{1,0} bitcast(%p1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %u = f32[8,100]{1,0} dynamic-update-slice(%p0, %b, %p2, %z)
}

ENTRY %main (a: f32[8,100], v: f32[100], i: s32[]) -> f32[8,100] {
  %a = f32[8,100]{1,0} parameter(0)
  %v = f32[100]{0} parameter(1)
  %i = s32[] parameter(2)
  %c = f32[8,100]{1,0} copy(%a)
  ROOT %f = f32[8,100]{1,0} fusion(%c, %v, %i), kind=kLoop, calls=%fused
}
"""
    counts = hlo.local_path(text)
    # the copy reads and writes 3200 bytes each; the in-place update reads v (400) and writes 400, reads i (4)
    assert counts == {"bytes": 6400 + 800 + 4, "copies": 1, "copy_bytes": 3200, "collectives": 0,
                      "unknown_trip_counts": 0}
    np.testing.assert_equal(hlo.count_ratio(counts, counts, 3200)["verdict"], "met")
