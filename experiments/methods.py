"""The registry at the CLI's edge: a ``Config`` -> the learning-rate schedule,
the averaging schedule, the optimizers, the model's loss and the strategy.

Names (``names.METHODS``) are turned into library constructors here and
nowhere else; the library itself does no dispatch by string.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

import adpsgd_jax as A
from adpsgd_jax import distributed, schedules, streaming
from experiments import data, models, plugins
from experiments.config import Config, ConfigError
from experiments.names import is_plugin, method_parts


def lr_schedule(config: Config, steps_per_epoch: int, total_steps: int):
    """Learning rate per step: step decay at epochs (default 50% and 75%), cosine, or constant."""
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, total_steps)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.lr)
    boundaries = {step: config.lr_decay_factor for step in decay_steps(config, steps_per_epoch)}
    return optax.piecewise_constant_schedule(config.lr, boundaries)


def decay_steps(config: Config, steps_per_epoch: int) -> list[int]:
    """Steps of the step-decay boundaries (default epochs: 50% and 75% of the run)."""
    if config.lr_schedule != "step":
        return []
    epochs = config.lr_decay_epochs or (config.epochs // 2, (3 * config.epochs) // 4)
    return sorted({int(e * steps_per_epoch) for e in epochs if 0 < e < config.epochs})


def stagewise_base_period(total_steps: int, boundaries: list[int], budget: int, factor: float = 2.0) -> int:
    """The base period whose stagewise run spends closest to ``budget`` syncs."""

    def count(p0):
        t, n = 0, 0
        while True:
            stage = sum(t >= b for b in boundaries)
            t += max(1, round(p0 * factor**stage))
            if t > total_steps:
                return n
            n += 1

    return min(range(1, max(2, total_steps + 1)), key=lambda p0: (abs(count(p0) - budget), p0))


def make_schedule(config: Config, total_steps: int, steps_per_epoch: int, lr_fn) -> Optional[schedules.Schedule]:
    """The schedule of ``config.method`` (None for allreduce / qsgd); with ``fragments`` its streaming options
    checked against it (a fragment's delay against the schedule's first period times P)."""
    schedule = _schedule(config, total_steps, steps_per_epoch, lr_fn)
    if schedule is not None:
        try:
            streaming.check(config.fragments, config.fragment_delay, config.fragment_alpha, schedule, False)
        except ValueError as err:
            raise ConfigError(f"--fragments {config.fragments} / --fragment-delay {config.fragment_delay}: "
                              f"{err}") from None
    return schedule


def _schedule(config: Config, total_steps: int, steps_per_epoch: int, lr_fn) -> Optional[schedules.Schedule]:
    """The schedule of ``config.method`` at budget ``avg_period`` / ``fragments`` (its rounds: P per full-model sync)."""
    _, name = method_parts(config.method)
    p = config.avg_period // config.fragments
    if name is None:
        return None
    if is_plugin(name):
        return plugins.build(name, total_steps=total_steps, avg_period=p, lr_schedule=lr_fn)
    if name == "constant":
        return schedules.constant(p)
    if name == "every_step":
        return schedules.every_step()
    if name == "post_local":  # PyTorch's post-local SGD: W allreduce steps, then averages after W, W+p, ...
        warmup = round(config.local_warmup_epochs * steps_per_epoch) or total_steps // 10
        return schedules.post_local(warmup, p)
    if name == "stagewise":
        bounds = decay_steps(config, steps_per_epoch) or [total_steps // 2, (3 * total_steps) // 4]
        return schedules.stagewise(stagewise_base_period(total_steps, bounds, total_steps // p), bounds, 2.0)
    if name == "adacomm":
        # Start at twice the budget's period, revised once an epoch.
        return schedules.adacomm(period=2 * p, interval=steps_per_epoch)
    if name == "adpsgd":
        return schedules.adpsgd(total_steps, p, lr_schedule=lr_fn)
    if name == "adpsgd_trend":
        return schedules.adpsgd(total_steps, p, lr_schedule=lr_fn, forecast=schedules.trend_forecast())
    if name == "lr_proportional":
        return schedules.lr_proportional(total_steps, p, lr_schedule=lr_fn)
    if name == "qsr":
        return qsr_schedule(config, total_steps, lr_fn, p)
    if name == "trigger":
        return schedules.variance_trigger(total_steps, p, lr_schedule=lr_fn)
    raise AssertionError(name)


def qsr_schedule(config: Config, total_steps: int, lr_fn, period: int) -> schedules.Schedule:
    """QSR: the published rule at ``--qsr-alpha`` (no budget), else the rule whose alpha is searched so
    that its own sync count is nearest the budget of average period ``period`` (``--avg-period`` / P)."""
    kw = dict(init_h=config.qsr_init_period, min_h=config.qsr_min_period, power=config.qsr_power,
              lr_schedule=lr_fn)
    if config.qsr_alpha is not None:
        return schedules.qsr(total_steps, alpha=config.qsr_alpha, **kw)
    try:
        return schedules.qsr(total_steps, period, **kw)
    except ValueError as err:
        raise ValueError(f"--qsr-min-period {config.qsr_min_period} with --avg-period {config.avg_period}: "
                         f"{err}") from None


def make_optimizer(config: Config, lr) -> optax.GradientTransformation:
    """The local optimizer: weight decay added to the gradient, then SGD with momentum at ``lr`` (schedule or float)."""
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum or None))


def make_outer_optimizer(config: Config) -> Optional[optax.GradientTransformation]:
    """The outer optimizer of ``config`` (None for plain averaging)."""
    if config.outer_optimizer == "none":
        return None
    nesterov = config.outer_optimizer == "nesterov"
    return optax.sgd(config.outer_lr, momentum=config.outer_momentum or None, nesterov=nesterov)


def group_size(config: Config) -> int:
    """Workers per group: ``host`` is the devices of one process among the run's workers."""
    return config.workers // jax.process_count() if config.group_size == "host" else config.group_size


def model_fns(config: Config, dataset: data.Dataset):
    """(model, loss_fn, eval_fn) of ``config.model`` on ``dataset``: normalised uint8 inputs, cross-entropy, accuracy."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    model = models.create(config.model, dataset.num_classes, dtype)
    mean, std = dataset.mean, dataset.std

    def loss_fn(params, model_state, batch, rng):
        del rng
        x = data.normalize(batch["image"], mean, std)
        logits, model_state = models.apply(model, params, model_state, x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (model_state, {"accuracy": accuracy})

    def eval_fn(params, model_state, chunk):
        x = data.normalize(chunk["image"], mean, std)
        logits, _ = models.apply(model, params, model_state, x, train=False)
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, chunk["label"]),
            "correct": (jnp.argmax(logits, -1) == chunk["label"]).astype(jnp.float32),
        }

    return model, loss_fn, eval_fn


def make_strategy(config: Config, loss_fn, lr_fn, schedule: Optional[schedules.Schedule],
                  layout: distributed.Layout) -> A.Strategy:
    """The library strategy of ``config.method`` on ``layout``'s worker axes.

    Two-level: the schedule averages across groups, gradients are averaged inside them.
    """
    optimizer = make_optimizer(config, lr_fn)
    strategy = method_parts(config.method)[0]
    if strategy == "allreduce":
        return A.allreduce(loss_fn, optimizer, workers=layout)
    if strategy == "qsgd":
        return A.qsgd(loss_fn, optimizer, levels=config.qsgd_levels, bucket_size=config.qsgd_bucket_size,
                      workers=layout)
    return A.local_sgd(loss_fn, optimizer, schedule, workers=layout, outer_optimizer=make_outer_optimizer(config),
                       fragments=config.fragments, fragment_delay=config.fragment_delay,
                       fragment_alpha=config.fragment_alpha)
