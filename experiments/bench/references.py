"""What the benchmark measures the library's step against: the task, a local step with no
gate and no collective (item 1), and a plain single-device flax loop (items 4, 5)."""

from __future__ import annotations

from typing import Any

from experiments import config as cfg


def image_task(model_name: str, per_device_batch: int, num_devices: int, stand_in: bool = False):
    """The training run's model, loss and optimizer (``methods.model_fns`` / ``make_optimizer``, CIFAR recipe:
    lr 0.1, momentum 0.9, weight decay 5e-4) on the synthetic CIFAR-shaped set, and a fixed batch
    [D, B, 32, 32, 3] of it. ``stand_in``: the variables from ``stand_in_variables`` instead of the
    model's initialisers."""
    import jax

    from experiments import data, methods, models

    config = cfg.Config(dataset="synthetic", model=model_name)
    dataset = data.load("synthetic", synthetic_size=num_devices * per_device_batch)
    model, loss_fn, _ = methods.model_fns(config, dataset)
    init = stand_in_variables if stand_in else models.init
    params, model_state = init(model, jax.random.PRNGKey(0), dataset.train_images.shape[1:])
    shape = (num_devices, per_device_batch)
    batch = {"image": dataset.train_images.reshape(shape + dataset.train_images.shape[1:]),
             "label": dataset.train_labels.reshape(shape)}
    optimizer = methods.make_optimizer(config, config.lr)
    return model, params, model_state, loss_fn, optimizer, batch, (dataset.mean, dataset.std)


def stand_in_variables(model, rng, input_shape):
    """(params, model_state) at the shapes ``models.init`` gives, drawn with numpy instead of the model's
    initialisers (ResNet-18's take 10-15 s on the 2-core CPU; its step takes about 1 s).

    Kernels (2 or more axes) ~ N(0, 1 / fan_in), fan_in the product of all
    but the last axis; batch-norm scales 1, other vectors 0; the running
    variance 1 and every other model-state leaf 0. For timing only: a step's
    time does not depend on these values (dense float32 arithmetic with no
    data-dependent branch, and values of the usual magnitude, no denormals).
    """
    import jax
    import numpy as np

    from experiments import models

    shapes = jax.eval_shape(lambda key: models.init(model, key, input_shape), rng)
    draw = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**31 - 1)))

    def fill(path, leaf, ones=("scale", "var")):
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (draw.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        name = getattr(path[-1], "key", None)
        return np.full(leaf.shape, 1 if name in ones else 0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def local_only_step(loss_fn, optimizer, loop=None):
    """The local step with no gate and no collective: the reference of item 1.

    Same gradient (run over a device's workers by ``loop``, as the layout's
    strategy runs it), optimizer update and step counter as ``local_sgd``'s
    local path; no ``should_sync``, no ``lax.cond``, no byte counter.
    """
    import jax
    import optax

    from adpsgd_jax import loops

    grad_fn = loops.looped(jax.value_and_grad(loss_fn, has_aux=True), loop or loops.VMAP)

    def step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (model_state, aux)), grads = grad_fn(state.params, state.model_state, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state), \
            {"loss": loss, **aux}

    return step


def plain_flax_loop(model, params, model_state, optimizer, stats):
    """A single-device training step written the usual flax way (the practical limit).

    ``flax.training.train_state.TrainState`` with the batch statistics beside
    it, ``jax.jit`` with the state donated.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    from experiments import data

    class State(train_state.TrainState):
        model_state: Any

    mean, std = stats

    @jax.jit
    def plain_step(state, batch):
        def loss(params):
            x = data.normalize(batch["image"], mean, std)
            variables = {"params": params, **state.model_state}
            if state.model_state:
                logits, updates = state.apply_fn(variables, x, train=True, mutable=list(state.model_state))
            else:
                logits, updates = state.apply_fn(variables, x, train=True), {}
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return ce, (logits, updates)

        (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, model_state={**state.model_state, **updates})
        return state, {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    state = State.create(apply_fn=model.apply, params=params, tx=optimizer, model_state=model_state)
    return jax.jit(plain_step, donate_argnums=(0,)), state
