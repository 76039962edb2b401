import numpy as np
import pytest
from keras import ops

from keras_moe.layers import ShallowEmbedding
from tests.testing import conv2d_reference
from tests.testing import gradients
from tests.testing import run_layer_test


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def embedding_reference(layer, images):
    """NumPy forward pass of ShallowEmbedding in inference mode."""
    x = images.astype("float64")
    for i, conv in enumerate(layer.convs):
        kernel = ops.convert_to_numpy(conv.kernel)
        bias = None if conv.bias is None else ops.convert_to_numpy(conv.bias)
        x = conv2d_reference(x, kernel, bias, strides=2, padding="same")
        if layer.use_batch_norm:
            bn = layer.norms[i]
            mean = ops.convert_to_numpy(bn.moving_mean)
            var = ops.convert_to_numpy(bn.moving_variance)
            gamma = ops.convert_to_numpy(bn.gamma)
            beta = ops.convert_to_numpy(bn.beta)
            x = (x - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
        x = np.maximum(x, 0.0)
    x = x.mean(axis=(1, 2))
    dense = layer.projection
    e = softmax(
        x @ ops.convert_to_numpy(dense.kernel)
        + ops.convert_to_numpy(dense.bias)
    )
    if layer.class_head is None:
        return e, e
    head = layer.class_head
    probs = softmax(
        e @ ops.convert_to_numpy(head.kernel) + ops.convert_to_numpy(head.bias)
    )
    return e, probs


@pytest.mark.parametrize("use_batch_norm", [True, False])
@pytest.mark.parametrize("num_classes", [6, 4])
def test_matches_reference(use_batch_norm, num_classes):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 16, 16, 3)).astype("float32")
    layer = ShallowEmbedding(
        6,
        num_layers=3,
        filters=4,
        num_classes=num_classes,
        use_batch_norm=use_batch_norm,
    )
    e, probs = layer(images, training=False)
    e_ref, probs_ref = embedding_reference(layer, images)
    np.testing.assert_allclose(ops.convert_to_numpy(e), e_ref, atol=1e-5)
    np.testing.assert_allclose(
        ops.convert_to_numpy(probs), probs_ref, atol=1e-5
    )
    np.testing.assert_allclose(ops.convert_to_numpy(e).sum(-1), 1.0, atol=1e-5)
    # embedding_dim == num_classes: e itself is the auxiliary prediction.
    assert (layer.class_head is None) == (num_classes == 6)


def test_layer_structure():
    layer = ShallowEmbedding(10, num_layers=5, filters=[8, 8, 16, 16, 32])
    out = layer(np.zeros((2, 64, 64, 3), "float32"))
    assert tuple(out.shape) == (2, 10)
    assert [c.strides for c in layer.convs] == [(2, 2)] * 5
    assert [c.kernel_size for c in layer.convs] == [(3, 3)] * 5
    assert [c.filters for c in layer.convs] == [8, 8, 16, 16, 32]
    assert ShallowEmbedding(4, num_layers=3, filters=8).layer_widths == [
        8,
        16,
        32,
    ]


def test_gradient_reaches_every_convolution():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    layer = ShallowEmbedding(5, num_layers=3, filters=4)
    layer(images)
    target = np.eye(5, dtype="float32")[[0, 1, 2, 3]]
    weight_grads, _ = gradients(
        layer, (images,), lambda e: ops.sum(ops.square(ops.subtract(e, target)))
    )
    for conv in layer.convs:
        assert np.any(weight_grads[conv.kernel.path])


def test_layer_contract(tmp_path):
    rng = np.random.default_rng(2)
    run_layer_test(
        ShallowEmbedding,
        dict(embedding_dim=8, num_layers=2, filters=4, num_classes=3),
        rng.normal(size=(4, 16, 16, 3)).astype("float32"),
        expected_output_shape=((4, 8), (4, 3)),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(embedding_dim=4, num_layers=0), "num_layers"),
        (dict(embedding_dim=4, filters=-1), "filters"),
        (dict(embedding_dim=4, num_layers=2, filters=[4]), "filters"),
        (dict(embedding_dim=4, num_classes=0), "num_classes"),
        (dict(embedding_dim=4, data_format="nhwc"), "data_format"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShallowEmbedding(**kwargs)


def test_invalid_input_rank():
    with pytest.raises(ValueError, match="inputs_shape=\\(2, 16, 3\\)"):
        ShallowEmbedding(4)(np.zeros((2, 16, 3), "float32"))
