"""Tests for experiments/models.py (shapes, parameter counts, batch norm, bf16, training)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.extend  # noqa: E402,F401
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from experiments import models, names  # noqa: E402

CIFAR = (32, 32, 3)
DIGITS = (8, 8, 1)
SHAPES = {"resnet18": CIFAR, "vgg16": CIFAR, "cnn": DIGITS, "mlp": DIGITS}


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def init_key(seed):
    """An RngBitGenerator key (jax's "rbg"): the initialisers compile in about half the time of threefry's
    (ResNet-18: ~3 s instead of ~6 s here)."""
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def built():
    """name -> (model, params, model_state), float32, 10 classes (initialised once)."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        model = models.create(name, 10)
        params, state = models.init(model, init_key(i), shape)
        out[name] = (model, params, state)
    return out


def batch(shape, n=2, seed=0, offset=0.0):
    return jax.random.normal(jax.random.key(seed), (n, *shape)) + offset


@pytest.mark.parametrize("name", list(SHAPES))
def test_output_shape_and_dtype(built, name):
    model, params, state = built[name]
    x = batch(SHAPES[name])
    for train in (True, False):
        logits, _ = models.apply(model, params, state, x, train)
        assert logits.shape == (2, 10)
        assert logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))
    # Different inputs give different logits (the network is not constant).
    other, _ = models.apply(model, params, state, batch(SHAPES[name], seed=1), False)
    assert not np.allclose(np.asarray(other), np.asarray(logits))
    # Params are float32 and the expected collections exist.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert set(state) == ({"batch_stats"} if name in ("resnet18", "vgg16") else set())


def _resnet18_count(num_classes):
    bn = lambda c: 2 * c  # noqa: E731  (scale + bias)
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731  (no bias)
    total = conv(3, 3, 64) + bn(64)
    cin = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            total += conv(3, cin, width) + bn(width) + conv(3, width, width) + bn(width)
            if cin != width:
                total += conv(1, cin, width) + bn(width)
            cin = width
    return total + 512 * num_classes + num_classes


def _vgg16_count(num_classes):
    total, cin = 0, 3
    for c in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
        total += 9 * cin * c + c + 2 * c  # conv kernel + conv bias + BN scale/bias
        cin = c
    return total + 512 * num_classes + num_classes


def _abstract_params(model, shape):
    variables = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, *shape)), train=False), jax.random.key(0)
    )
    return variables["params"], variables.get("batch_stats", {})


def test_param_counts(built):
    assert _resnet18_count(10) == 11_173_962
    assert _vgg16_count(10) == 14_728_266
    assert n_params(built["resnet18"][1]) == 11_173_962
    assert n_params(built["vgg16"][1]) == 14_728_266
    params100, stats100 = _abstract_params(models.ResNet18(100), CIFAR)
    assert n_params(params100) == _resnet18_count(100) == 11_220_132
    # Batch stats: mean + var per BN channel = same count as BN scale + bias.
    bn_channels = 64 + 2 * (2 * 64) + 2 * (2 * 128) + 128 + 2 * (2 * 256) + 256 + 2 * (2 * 512) + 512
    assert n_params(stats100) == 2 * bn_channels
    # Small models: conv1 320 + conv2 18,496 + fc1 (4*4*64)*128+128 + head 1,290.
    assert n_params(built["cnn"][1]) == 320 + 18_496 + 131_200 + 1_290
    assert n_params(built["mlp"][1]) == 64 * 128 + 128 + 128 * 10 + 10
    mlp2, _ = _abstract_params(models.MLP(10, hidden=(32, 16)), DIGITS)
    assert n_params(mlp2) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)


def test_batch_norm_train_updates_running_stats(built):
    model, params, state = built["resnet18"]
    x = batch(CIFAR, offset=0.5)
    _, new_state = models.apply(model, params, state, x, train=True)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    old_bs, new_bs = state["batch_stats"], new_state["batch_stats"]
    # Freshly initialised running stats: mean 0, var 1.
    assert np.all(np.asarray(old_bs["stem_bn"]["mean"]) == 0.0)
    assert np.all(np.asarray(old_bs["stem_bn"]["var"]) == 1.0)
    # Every BN layer's running stats moved.
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old_bs, new_bs)
    assert all(jax.tree.leaves(changed))
    # Momentum 0.9: running = 0.9 * old + 0.1 * batch statistic of the stem conv output.
    stem = nn.Conv(64, (3, 3), padding="SAME", use_bias=False).apply(
        {"params": params["stem_conv"]}, x
    )
    mean = jnp.mean(stem, axis=(0, 1, 2))
    var = jnp.var(stem, axis=(0, 1, 2))
    np.testing.assert_allclose(new_bs["stem_bn"]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_bs["stem_bn"]["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_batch_norm_eval_mode(built, name):
    model, params, state = built[name]
    x = batch(CIFAR, offset=0.5)
    # Use non-trivial running stats (after one train step) for the eval checks.
    _, state = models.apply(model, params, state, x, train=True)
    out1, state1 = models.apply(model, params, state, x, train=False)
    out2, state2 = models.apply(model, params, state, x, train=False)
    np.testing.assert_array_equal(out1, out2)
    for s in (state1, state2):
        same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state, s)
        assert all(jax.tree.leaves(same))
    # Eval uses running averages: an example's logits do not depend on the rest
    # of the batch. Train mode uses batch statistics, so they do.
    alone, _ = models.apply(model, params, state, x[:1], train=False)
    np.testing.assert_allclose(alone[0], out1[0], rtol=1e-4, atol=1e-4)
    train_full, _ = models.apply(model, params, state, x, train=True)
    train_alt, _ = models.apply(model, params, state, x.at[1].set(-x[1]), train=True)
    assert not np.allclose(np.asarray(train_full[0]), np.asarray(train_alt[0]), atol=1e-3)
    assert not np.allclose(np.asarray(train_full), np.asarray(out1), atol=1e-3)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_models_without_batch_norm_have_empty_state(built, name):
    model, params, state = built[name]
    assert state == {}
    x = batch(DIGITS)
    logits_train, new_state = models.apply(model, params, state, x, train=True)
    logits_eval, eval_state = models.apply(model, params, state, x, train=False)
    assert new_state == {} and eval_state == {}
    # No train/eval-dependent layers: both modes compute the same function.
    np.testing.assert_allclose(logits_train, logits_eval, rtol=1e-6, atol=1e-6)


def test_bf16_compute_dtype_resnet():
    model = models.create("resnet18", 10, dtype=jnp.bfloat16)
    params, stats = _abstract_params(model, CIFAR)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats))
    x = jnp.zeros((2, *CIFAR), jnp.float32)
    fn = lambda p, s, x: models.apply(model, p, {"batch_stats": s}, x, True)  # noqa: E731
    logits, new_state = jax.eval_shape(fn, params, stats, x)
    # Logits are cast back to float32 (documented); running stats stay float32.
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(new_state))
    # The convolutions themselves run in bf16.
    jaxpr = jax.make_jaxpr(fn)(params, stats, x)
    convs = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                convs.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert len(convs) == 1 + 16 + 3  # stem + 16 block convs + 3 projections
    assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)


def test_bf16_small_cnn_close_to_float32(built):
    model32, params, _ = built["cnn"]
    model16 = models.create("cnn", 10, dtype=jnp.bfloat16)
    x = batch(DIGITS, n=4)
    out32, _ = models.apply(model32, params, {}, x, False)
    out16, _ = models.apply(model16, params, {}, x, False)
    assert out16.dtype == jnp.float32
    # bf16 has ~3 significant digits: close but not bit-identical to float32.
    np.testing.assert_allclose(out16, out32, rtol=5e-2, atol=5e-2)
    assert not np.array_equal(np.asarray(out16), np.asarray(out32))


def test_sgd_reduces_small_cnn_loss(built):
    model, params, state = built["cnn"]
    x = batch(DIGITS, n=16, seed=3)
    y = jax.random.randint(jax.random.key(4), (16,), 0, 10)
    opt = optax.sgd(0.05, momentum=0.9)

    def loss_fn(p):
        logits, _ = models.apply(model, p, state, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss, g

    opt_state = opt.init(params)
    p, opt_state, loss0, grads = step(params, opt_state)
    # Gradients reach every parameter.
    assert all(float(jnp.linalg.norm(g)) > 0 for g in jax.tree.leaves(grads))
    for _ in range(30):
        p, opt_state, loss, _ = step(p, opt_state)
    final = float(loss_fn(p))
    assert final < 0.5 * float(loss0)


def test_create_and_registry():
    assert tuple(models.CONSTRUCTORS) == names.MODELS == ("resnet18", "vgg16", "cnn", "mlp")
    m = models.create("vgg16", 100, dtype=jnp.bfloat16)
    assert isinstance(m, models.VGG16) and m.num_classes == 100 and m.dtype == jnp.bfloat16
    assert isinstance(models.create("mlp", 3), models.MLP)
    with pytest.raises(ValueError, match="--model") as err:
        models.create("resnet50", 10)
    msg = str(err.value)
    assert "resnet50" in msg
    for name in models.CONSTRUCTORS:
        assert name in msg


MNIST = (28, 28, 1)


@pytest.mark.parametrize("name", list(models.CONSTRUCTORS))
@pytest.mark.parametrize("shape", [MNIST, (8, 8, 3), (48, 40, 3), (1, 1, 2)], ids=["28x28x1", "8x8x3", "48x40x3", "1x1x2"])
def test_every_model_takes_any_image_size_and_channel_count(name, shape):
    model = models.create(name, 7)
    x = batch(shape, n=3)
    if name in ("resnet18", "vgg16") and shape != MNIST:
        # Shapes and dtypes only, by abstract evaluation: compiling the two big models at every size
        # costs about 4-5 s each here; both run for real on 28x28x1 and in the tests above.
        params, state = jax.eval_shape(lambda: models.init(model, jax.random.key(0), shape))
        for train in (True, False):
            logits = jax.eval_shape(lambda p, s: models.apply(model, p, s, x, train)[0], params, state)
            assert logits.shape == (3, 7) and logits.dtype == jnp.float32
        return
    params, state = models.init(model, init_key(0), shape)  # applied as the train step does, under jit
    for train in (True, False):
        logits, _ = jax.jit(lambda p, s: models.apply(model, p, s, x, train))(params, state)
        assert logits.shape == (3, 7) and logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_parameter_counts_on_other_image_shapes():
    # resnet18 and vgg16 pool any image down to one 512-vector: only the first conv sees the channels.
    stem = lambda c: 9 * c * 64  # noqa: E731
    assert n_params(_abstract_params(models.ResNet18(10), MNIST)[0]) == _resnet18_count(10) - stem(3) + stem(1)
    assert n_params(_abstract_params(models.VGG16(10), MNIST)[0]) == _vgg16_count(10) - stem(3) + stem(1)
    # ...unless it is larger than 32x32: vgg16 then flattens a (H/32)x(W/32)x512 map.
    assert n_params(_abstract_params(models.VGG16(10), (64, 32, 3))[0]) == _vgg16_count(10) + 512 * 10
    # cnn and mlp flatten: the first dense layer grows with H x W.
    assert n_params(_abstract_params(models.SmallCNN(10), MNIST)[0]) == 320 + 18_496 + 14 * 14 * 64 * 128 + 128 + 1_290
    assert n_params(_abstract_params(models.MLP(10), MNIST)[0]) == 784 * 128 + 128 + 1_290
