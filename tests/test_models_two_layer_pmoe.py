import keras
import numpy as np
import pytest

from keras_moe.analysis import discriminative_routing
from keras_moe.data import make_patch_digits
from keras_moe.models import TwoLayerCNN
from keras_moe.models import TwoLayerPMoE
from keras_moe.training import RouterTrainer
from keras_moe.training import train_routers
from tests.testing import to_numpy

SPREAD = {"class_name": "RandomNormal", "config": {"stddev": 1.0}}


def softmax(z):
    z = np.exp(z - z.max())
    return z / z.sum()


def patches_of(x, patch):
    """`(batch, n, d)` patches, row-major over the grid."""
    b, h, w, c = x.shape
    p = x.reshape(b, h // patch, patch, w // patch, patch, c)
    return p.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch * patch * c)


def weights_of(model):
    layer = model.pmoe_layer
    router = to_numpy(layer.router).astype("float64")
    experts = [
        to_numpy(e.kernel).astype("float64").reshape(router.shape[0], -1)
        for e in layer.expert_layers
    ]
    output = to_numpy(model.get_layer("output").kernel).astype("float64")
    return router, experts, output


def pmoe_reference(model, x):
    """pMoE eq. 1 (and eq. 23 for several classes), with loops."""
    router, experts, output = weights_of(model)
    per_expert = model.patches_per_expert
    neurons = model.neurons_per_expert
    logits = np.zeros((len(x), output.shape[1]))
    for b, patches in enumerate(patches_of(x.astype("float64"), 8)):
        for s, w in enumerate(experts):
            r = patches @ router[:, s]
            chosen = np.argsort(-r, kind="stable")[:per_expert]
            if model.gating == "hard":
                gates = np.ones(per_expert)  # eq. 3
            else:
                gates = softmax(r[chosen])  # eq. 4
            for j, g in zip(chosen, gates):
                hidden = np.maximum(patches[j] @ w, 0.0) * g
                a = output[s * neurons : (s + 1) * neurons]
                logits[b] += hidden @ a / per_expert
    return logits


def tiny_pmoe(**kwargs):
    config = dict(
        num_experts=2,
        neurons_per_expert=3,
        patches_per_expert=2,
        patch_size=8,
        input_shape=(32, 32, 1),
    )
    return TwoLayerPMoE(**{**config, **kwargs})


def toy_digits(seed=0, per_digit=12, size=8):
    """Ten sparse binary "digits" with flipped pixels: `(images, labels)`."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((10, size, size)) < 0.25
    labels = np.repeat(np.arange(10), per_digit)
    flips = rng.random((len(labels), size, size)) < 0.05
    return (prototypes[labels] ^ flips).astype("float32"), labels


@pytest.mark.parametrize("gating", ["softmax", "hard"])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_pmoe_matches_equation_1(gating, num_classes):
    model = tiny_pmoe(
        gating=gating,
        num_classes=num_classes,
        num_experts=4,
        router_initializer=SPREAD,
        expert_initializer=SPREAD,
    )
    x = np.random.default_rng(1).random((3, 32, 32, 1)).astype("float32")
    logits = to_numpy(model(x))
    assert logits.shape == (3, 1 if num_classes == 2 else num_classes)
    np.testing.assert_allclose(
        logits, pmoe_reference(model, x), rtol=1e-4, atol=1e-4
    )


def test_cnn_matches_equation_5():
    model = TwoLayerCNN(5, 8, input_shape=(32, 32, 1))
    x = np.random.default_rng(2).random((3, 32, 32, 1)).astype("float32")
    kernel = to_numpy(model.get_layer("neurons").kernel).reshape(64, 5)
    a = to_numpy(model.get_layer("output").kernel)
    patches = patches_of(x.astype("float64"), 8)
    expected = np.maximum(patches @ kernel, 0).mean(axis=1) @ a
    np.testing.assert_allclose(to_numpy(model(x)), expected, rtol=1e-4)


def test_experts_start_different_and_output_layer_is_fixed():
    model = tiny_pmoe(num_classes=3, num_experts=2)
    _, experts, output = weights_of(model)
    assert not np.allclose(experts[0], experts[1])
    assert output.std() == pytest.approx(1.0, rel=0.5)  # a ~ N(0, 1)
    x = np.random.default_rng(3).random((8, 32, 32, 1)).astype("float32")
    y = np.arange(8) % 3
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    _, trained, after = weights_of(model)
    np.testing.assert_array_equal(after, output)
    assert not np.allclose(trained[0], experts[0])

    trainable = tiny_pmoe(train_output_layer=True)
    assert trainable.get_layer("output").kernel.trainable


def test_joint_training_learns_the_patch_task():
    images, labels = toy_digits()
    x, y, _ = make_patch_digits(images, labels, 96, seed=0)
    x_test, y_test, _ = make_patch_digits(images, labels, 64, seed=1)
    keras.utils.set_random_seed(0)
    model = tiny_pmoe(num_experts=4, neurons_per_expert=8, patches_per_expert=3)
    router_before = to_numpy(model.pmoe_layer.router)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    history = model.fit(x, y, epochs=30, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.2 * losses[0]
    # Joint training moves the routers too (softmax gates, eq. 4).
    assert not np.allclose(to_numpy(model.pmoe_layer.router), router_before)
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    assert accuracy > 0.9


def test_separate_training_routes_then_trains_experts_behind_frozen_routers():
    images, labels = toy_digits()
    x, y, _ = make_patch_digits(images, labels, 256, seed=0)
    x_test, y_test, positions = make_patch_digits(images, labels, 64, seed=1)
    keras.utils.set_random_seed(0)
    model = tiny_pmoe(gating="hard", neurons_per_expert=16)
    _, experts_before, output_before = weights_of(model)
    train_routers(model, x, y, epochs=2, batch_size=32, verbose=0)
    _, experts_after, output_after = weights_of(model)
    # Step 1 touches the routers only, and leaves them frozen.
    for before, after in zip(experts_before, experts_after):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(output_before, output_after)
    assert not model.pmoe_layer.router.trainable
    assert all(e.kernel.trainable for e in model.pmoe_layer.expert_layers)

    # Router c ranks the class-c digit first (pMoE Lemma 4.1, figure 8).
    routing = model.pmoe_layer.route(
        keras.Model(model.input, model.pmoe_layer.input)(x_test)
    )
    result = discriminative_routing(
        to_numpy(routing["routing_values"]),
        y_test,
        positions,
        top=2,
        expert_for_class=[0, 1],
    )
    assert result["rate"] > 0.9

    router = to_numpy(model.pmoe_layer.router)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    model.fit(x[:96], y[:96], epochs=20, batch_size=16, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.pmoe_layer.router), router)
    assert not np.allclose(weights_of(model)[1][0], experts_after[0])
    assert model.evaluate(x_test, y_test, verbose=0)[1] > 0.9


def test_router_loss_is_equation_6_with_class_pairs():
    model = tiny_pmoe(num_experts=4, num_classes=4, router_initializer=SPREAD)
    trainer = RouterTrainer(model)
    x = np.random.default_rng(4).random((6, 32, 32, 1)).astype("float32")
    y = np.array([0, 1, 2, 3, 1, 2])
    router = to_numpy(model.pmoe_layer.router).astype("float64")
    sums = patches_of(x.astype("float64"), 8).sum(axis=1)  # sum_j x^(j)
    scores = sums @ router
    np.testing.assert_allclose(to_numpy(trainer(x)), scores, rtol=1e-4)
    partner = y + 1 - 2 * (y % 2)
    rows = np.arange(len(y))
    # Eq. 6 per pair: -y <w_1 - w_2, sum_j x^(j)>, class 2i playing y=+1.
    expected = -np.mean(scores[rows, y] - scores[rows, partner])
    trainer.compile(optimizer="sgd")
    loss = trainer.evaluate(x, y, batch_size=6, verbose=0, return_dict=True)
    assert loss["loss"] == pytest.approx(expected, rel=1e-4)


def test_router_training_validates_its_inputs():
    with pytest.raises(ValueError, match="even number of experts"):
        RouterTrainer(tiny_pmoe(num_experts=3))
    model = tiny_pmoe()
    x = np.zeros((4, 32, 32, 1), "float32")
    with pytest.raises(ValueError, match="labels must lie in"):
        train_routers(model, x, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="exactly one PatchExpertChoiceMoE"):
        RouterTrainer(TwoLayerCNN(4, 8, input_shape=(32, 32, 1)))
    # A failed call leaves the network's trainable flags alone.
    assert all(v.trainable for v in model.pmoe_layer.weights)


def test_serialization_round_trip(tmp_path):
    for model in (
        tiny_pmoe(gating="hard", num_classes=3),
        TwoLayerCNN(4, 8, input_shape=(32, 32, 1), train_output_layer=True),
    ):
        x = np.random.default_rng(5).random((2, 32, 32, 1)).astype("float32")
        expected = to_numpy(model(x))
        clone = model.__class__.from_config(model.get_config())
        assert clone.get_config() == model.get_config()
        path = str(tmp_path / f"{model.name}.keras")
        model.save(path)
        restored = keras.models.load_model(path, safe_mode=True)
        np.testing.assert_allclose(to_numpy(restored(x)), expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=5), "patch_size"),
        (dict(patch_size=(8, 0)), "patch_size"),
        (dict(num_classes=1), "num_classes"),
        (dict(neurons_per_expert=0), "neurons_per_expert"),
        (dict(patches_per_expert=17), "patches_per_expert"),
        (dict(gating="top2"), "gating"),
        (dict(input_shape=(32, 32)), "input_shape"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pmoe(**kwargs)


def test_cnn_invalid_arguments():
    with pytest.raises(ValueError, match="num_neurons"):
        TwoLayerCNN(0, 8, input_shape=(32, 32, 1))
    with pytest.raises(ValueError, match="patch_size"):
        TwoLayerCNN(4, 7, input_shape=(32, 32, 1))


def test_router_training_leaves_the_layers_below_alone():
    # A WRN-pMoE: batch normalization and convolutions before the routers.
    from keras_moe.models import WideResNet

    model = WideResNet(
        depth=10,
        widening_factor=1,
        num_classes=2,
        input_shape=(8, 8, 3),
        pmoe=dict(num_experts=2, patches_per_expert=2, patch_size=1),
    )
    x = np.random.default_rng(6).random((8, 8, 8, 3)).astype("float32")
    y = np.arange(8) % 2
    below = [
        v
        for v in model.weights
        if not v.path.startswith("pmoe/") and not v.path.startswith("logits")
    ]
    before = [to_numpy(v) for v in below]
    router = to_numpy(model.pmoe_layer.router)
    train_routers(model, x, y, epochs=2, batch_size=4, verbose=0)
    for value, variable in zip(before, below):
        np.testing.assert_array_equal(value, to_numpy(variable))
    assert not np.allclose(router, to_numpy(model.pmoe_layer.router))
