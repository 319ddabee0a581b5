"""What the benchmark measures the library's step against: the task, a local step with no
gate and no collective (item 1), and a plain single-device flax loop (items 4, 5)."""

from __future__ import annotations

from typing import Any

from experiments import config as cfg


def image_task(model_name: str, per_device_batch: int, num_devices: int):
    """The training run's model, loss and optimizer (``methods.model_fns`` / ``make_optimizer``, CIFAR recipe:
    lr 0.1, momentum 0.9, weight decay 5e-4) on the synthetic CIFAR-shaped set, and a fixed batch
    [D, B, 32, 32, 3] of it."""
    import jax

    from experiments import data, methods, models

    config = cfg.Config(dataset="synthetic", model=model_name)
    dataset = data.load("synthetic", synthetic_size=num_devices * per_device_batch)
    model, loss_fn, _ = methods.model_fns(config, dataset)
    params, model_state = models.init(model, jax.random.PRNGKey(0), dataset.train_images.shape[1:])
    shape = (num_devices, per_device_batch)
    batch = {"image": dataset.train_images.reshape(shape + dataset.train_images.shape[1:]),
             "label": dataset.train_labels.reshape(shape)}
    optimizer = methods.make_optimizer(config, config.lr)
    return model, params, model_state, loss_fn, optimizer, batch, (dataset.mean, dataset.std)


def local_only_step(loss_fn, optimizer):
    """The local step with no gate and no collective: the reference of item 1.

    Same gradient, optimizer update and step counter as ``local_sgd``'s
    local path; no ``should_sync``, no ``lax.cond``, no byte counter.
    """
    import jax
    import optax

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

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
