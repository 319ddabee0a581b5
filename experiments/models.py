"""Flax linen models for the data-parallel experiments.

All models take NHWC float inputs (already normalised) and return logits of
shape ``[N, num_classes]``. They are called as ``model.apply(variables, x,
train=...)``; the helpers :func:`init` and :func:`apply` below keep the
trainable ``params`` and the non-trainable model state (``batch_stats``) as
separate pytrees, which is what a pure-functional training step needs.

``dtype`` is the computation dtype: parameters are always stored in float32
(``param_dtype`` is left at its float32 default), inputs and activations are
cast to ``dtype`` (e.g. ``jnp.bfloat16`` on GPU). Logits are always returned
as float32 so that the loss is computed in full precision.

Models (every one takes images [N, H, W, C] of any size and channel count):
  * ``ResNet18``: CIFAR ResNet-18 (3x3 stem, no max-pool), built for [N, 32, 32, 3];
    global average pooling makes it take any H, W (28x28x1 MNIST included).
  * ``VGG16``: CIFAR VGG-16 (configuration D) with batch norm, built for
    [N, 32, 32, 3]; a max-pool is skipped once a side is down to 1 pixel, so
    smaller images pass too, and larger ones end as a larger flattened map.
  * ``SmallCNN``: two 3x3 convs + two dense layers, for 8x8x1 digits; any H, W, C.
  * ``MLP``: flattens its input, then dense layers with ReLU; any shape.
The dense layer after the flattening in VGG16, SmallCNN and MLP grows with
H x W: it is what limits them to small images.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# He (Kaiming) normal init over fan-out, as customary for ReLU conv nets.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pool(pool: Callable, x: jax.Array) -> jax.Array:
    """A 2x2 stride-2 pool, skipped when a spatial side is below 2 (so any image size passes)."""
    if min(x.shape[1], x.shape[2]) < 2:
        return x
    return pool(x, (2, 2), strides=(2, 2))


def _batch_norm(train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity or projection shortcut.

    Input ``[N, H, W, C_in]`` -> output ``[N, H/stride, W/stride, features]``.
    """

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f, (k, k), strides=(s, s), padding="SAME" if k > 1 else "VALID",
            use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name=name,
        )
        y = conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = _batch_norm(train, self.dtype, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, "proj_conv")(x)
            x = _batch_norm(train, self.dtype, "proj_bn")(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: ``[N, 32, 32, 3]`` -> logits ``[N, num_classes]`` (float32).

    3x3 stride-1 64-channel stem (no max-pool), BasicBlocks [2, 2, 2, 2] with
    widths 64, 128, 256, 512 (stride 2 at the start of stages 2-4), global
    average pool, Dense. 11,173,962 parameters for 10 classes. Takes any
    H, W, C (SAME padding, global pool): a C-channel stem has 9 x C x 64 weights.
    """

    num_classes: int
    dtype: Dtype = jnp.float32
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        x = nn.Conv(64, (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(_batch_norm(train, self.dtype, "stem_bn")(x))
        for stage, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for block in range(n_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, stride, self.dtype, name=f"stage{stage + 1}_block{block + 1}")(
                    x, train
                )
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """CIFAR VGG-16 (configuration D) with batch norm.

    ``[N, 32, 32, 3]`` -> logits ``[N, num_classes]`` (float32). Thirteen 3x3
    convs (with bias) each followed by BN and ReLU, five 2x2 max-pools (so a
    32x32 input ends as 1x1x512), then a single Dense 512 -> num_classes.
    14,728,266 parameters for 10 classes. Other sizes: a pool is skipped
    once a side is 1 pixel (28x28 ends as 1x1x512 too); a larger input
    ends as (H/32)x(W/32)x512 and the Dense layer grows with it.
    """

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        i = 0
        for item in _VGG16_CFG:
            if item == "M":
                x = _pool(nn.max_pool, x)
                continue
            i += 1
            x = nn.Conv(item, (3, 3), padding="SAME", kernel_init=_conv_init,
                        dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(_batch_norm(train, self.dtype, f"bn{i}")(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


class SmallCNN(nn.Module):
    """Small CNN for digits: ``[N, 8, 8, 1]`` -> logits ``[N, num_classes]`` (float32).

    conv3x3(32) - ReLU - conv3x3(64) - ReLU - 2x2 avg-pool - flatten -
    Dense(128) - ReLU - Dense(num_classes). No batch norm (empty model state).
    Works for any input H, W, C: the Dense layer adapts to the flattened size
    (H/2 x W/2 x 64 inputs; the pool is skipped on a 1-pixel side).
    """

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # no train/eval-dependent layers
        x = x.astype(self.dtype)
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME", dtype=self.dtype, name="conv1")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="SAME", dtype=self.dtype, name="conv2")(x))
        x = _pool(nn.avg_pool, x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128, dtype=self.dtype, name="fc1")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


class MLP(nn.Module):
    """Multi-layer perceptron: ``[N, ...]`` -> logits ``[N, num_classes]`` (float32).

    Flattens all non-batch axes, then ``Dense(h) - ReLU`` for each ``h`` in
    ``hidden`` and a final ``Dense(num_classes)``. No batch norm.
    """

    num_classes: int
    hidden: Sequence[int] = (128,)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        x = x.astype(self.dtype).reshape((x.shape[0], -1))
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, dtype=self.dtype, name=f"fc{i + 1}")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {  # keys: names.MODELS, in order
    "resnet18": ResNet18,
    "vgg16": VGG16,
    "cnn": SmallCNN,
    "mlp": MLP,
}


def create(name: str, num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
    """Build the model registered under ``name`` (a ``--model`` value).

    Raises:
      ValueError: if ``name`` is not a key of :data:`CONSTRUCTORS`.
    """
    if name not in CONSTRUCTORS:
        raise ValueError(
            f"unknown --model {name!r}; accepted values: {', '.join(sorted(CONSTRUCTORS))}"
        )
    return CONSTRUCTORS[name](num_classes=num_classes, dtype=dtype)


def init(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> tuple[Any, dict]:
    """Initialise ``model`` with a batch of one zero example in eval mode.

    Args:
      model: a linen module from this file.
      rng: a PRNG key.
      input_shape: the shape of ONE example, without batch axis, e.g. ``(32, 32, 3)``.

    Returns:
      ``(params, model_state)``: ``params`` is the float32 ``"params"``
      collection; ``model_state`` is a dict of the remaining collections,
      ``{"batch_stats": ...}`` for models with batch norm, ``{}`` otherwise.
    """
    x = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
    variables = jax.jit(lambda key: model.init(key, x, train=False))(rng)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def apply(model: nn.Module, params: Any, model_state: dict, x: jax.Array,
          train: bool) -> tuple[jax.Array, dict]:
    """Run ``model`` on ``x`` of shape ``[N, ...]``.

    ``train`` must be a Python bool. In train mode batch norm normalises with
    the batch statistics and every collection of ``model_state`` (i.e.
    ``batch_stats``) is updated; in eval mode the running averages are used
    and ``model_state`` is returned unchanged.

    Returns:
      ``(logits [N, num_classes] float32, new_model_state)``.
    """
    variables = {"params": params, **model_state}
    if train and model_state:
        logits, updates = model.apply(variables, x, train=True, mutable=list(model_state))
        return logits, {**model_state, **dict(updates)}
    return model.apply(variables, x, train=train), model_state
