import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import PatchExpertChoiceMoE
from tests.testing import BACKEND
from tests.testing import conv2d_reference
from tests.testing import gradients
from tests.testing import is_zero_gradient
from tests.testing import run_layer_test
from tests.testing import to_numpy


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def pmoe_reference(layer, x):
    """pMoE eq. 1, 3 and 4 with loops over examples, experts and patches."""
    x = x.astype("float64")
    batch, height, width, _ = x.shape
    patch_h, patch_w = layer.patch_size
    grid_w = width // patch_w
    num_patches = (height // patch_h) * grid_w
    router = ops.convert_to_numpy(layer.router).astype("float64")
    experts = [
        (
            ops.convert_to_numpy(e.kernel).astype("float64"),
            ops.convert_to_numpy(e.bias).astype("float64"),
        )
        for e in layer.expert_layers
    ]
    filters = experts[0][0].shape[-1]
    k = layer.num_experts
    out_channels = k * filters if layer.combine == "concat" else filters
    out = np.zeros((batch, height, width, out_channels))
    all_indices = np.zeros((batch, k, layer.patches_per_expert), "int64")
    all_gates = np.zeros((batch, k, layer.patches_per_expert))

    def window(j):
        row, col = divmod(j, grid_w)
        return (
            slice(row * patch_h, (row + 1) * patch_h),
            slice(col * patch_w, (col + 1) * patch_w),
        )

    for b in range(batch):
        patches = [x[b][window(j)] for j in range(num_patches)]
        for s in range(k):
            # Routing value r_{s,j} = <w_s, x^(j)>.
            r = np.array([p.ravel() @ router[:, s] for p in patches])
            chosen = np.argsort(-r, kind="stable")[: layer.patches_per_expert]
            if layer.gating == "softmax":
                gate = softmax(r[chosen])  # eq. 4
            elif layer.gating == "hard":
                gate = np.ones(len(chosen))  # eq. 3
            else:
                gate = softmax(r)[chosen]
            all_indices[b, s], all_gates[b, s] = chosen, gate
            kernel, bias = experts[s]
            channels = (
                slice(s * filters, (s + 1) * filters)
                if layer.combine == "concat"
                else slice(0, filters)
            )
            for j, g in zip(chosen, gate):
                y = conv2d_reference(
                    patches[j][None], kernel, bias, padding="same"
                )[0]
                rows, cols = window(j)
                out[b, rows, cols, channels] += g * y
    return out, all_indices, all_gates


def random_map(batch=3, height=8, width=8, channels=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, height, width, channels)).astype("float32")


@pytest.mark.parametrize("gating", ["softmax", "hard", "softmax_all"])
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_matches_equations(gating, combine):
    x = random_map()
    layer = PatchExpertChoiceMoE(
        num_experts=3,
        patches_per_expert=2,
        patch_size=(2, 4),
        expert_filters=5,
        gating=gating,
        combine=combine,
        router_initializer=keras.initializers.RandomNormal(stddev=0.3),
    )
    layer.build(x.shape)
    for expert in layer.expert_layers:
        expert.bias.assign(np.random.default_rng(1).normal(size=5))
    outputs, routing = layer(x, return_routing=True)
    expected, indices, gates = pmoe_reference(layer, x)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(routing["indices"]), indices
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(routing["gates"]), gates, atol=1e-5
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(outputs), expected, rtol=1e-4, atol=1e-4
    )


def test_unselected_patches_give_exact_zeros():
    x = random_map(batch=2, height=8, width=8)
    # 16 patches of 2x2; 2 experts x 3 patches cover at most 6 of them.
    layer = PatchExpertChoiceMoE(2, 3, 2, expert_filters=3)
    layer.build(x.shape)
    for expert in layer.expert_layers:
        expert.bias.assign(np.ones(3))  # nonzero bias everywhere
    outputs, routing = layer(x, return_routing=True)
    outputs = ops.convert_to_numpy(outputs)
    indices = ops.convert_to_numpy(routing["indices"])
    for b in range(2):
        selected = set(indices[b].ravel().tolist())
        assert len(selected) < 16
        for j in range(16):
            row, col = divmod(j, 4)
            block = outputs[b, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
            if j in selected:
                assert np.any(block != 0)
            else:
                np.testing.assert_array_equal(block, 0.0)


class RecordingConv(keras.layers.Conv2D):
    """A convolution expert that records the shape of every batch it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_shapes = []

    def call(self, inputs):
        self.seen_shapes.append(tuple(inputs.shape))
        return super().call(inputs)


def test_experts_run_on_selected_patches_only():
    x = random_map(batch=2, height=16, width=16, channels=3)
    experts = [RecordingConv(4, 3, padding="same") for _ in range(4)]
    layer = PatchExpertChoiceMoE(
        num_experts=4, patches_per_expert=2, patch_size=4, experts=experts
    )
    out = layer(x)
    assert tuple(out.shape) == (2, 16, 16, 16)
    for expert in experts:
        # batch * l patches of 4x4, not the 16x16 map.
        assert expert.seen_shapes == [(2 * 2, 4, 4, 3)]


@pytest.mark.parametrize("placement", ["patch", "masked", "halo"])
@pytest.mark.parametrize("gating", ["softmax", "softmax_all", "hard"])
def test_router_gradient(gating, placement):
    x = random_map()
    layer = PatchExpertChoiceMoE(
        2,
        2,
        4,
        expert_filters=3,
        gating=gating,
        combine="sum",
        placement=placement,
    )
    layer.build(x.shape)
    weight_grads, input_grads = gradients(
        layer, (x,), lambda out: ops.sum(ops.square(out))
    )
    router_grad = weight_grads[layer.router.path]
    if gating == "hard":
        assert is_zero_gradient(router_grad)
    else:
        assert np.any(router_grad)
    for expert in layer.expert_layers:
        assert np.any(weight_grads[expert.kernel.path])
    assert np.any(input_grads[0])


def test_route_and_return_routing_in_functional_model():
    x = random_map()
    inputs = keras.Input(x.shape[1:])
    layer = PatchExpertChoiceMoE(2, 3, 2, expert_filters=3)
    outputs, routing = layer(inputs, return_routing=True)
    assert tuple(routing["indices"].shape) == (None, 2, 3)
    assert tuple(routing["routing_values"].shape) == (None, 16, 2)
    model = keras.Model(inputs, [outputs, routing["indices"]])
    out, indices = to_numpy(model(x))
    direct = layer.route(x)
    np.testing.assert_array_equal(
        indices, ops.convert_to_numpy(direct["indices"])
    )
    np.testing.assert_allclose(out, ops.convert_to_numpy(layer(x)), atol=1e-6)
    scores = ops.convert_to_numpy(direct["routing_values"])
    # The selected patches are the top-l routing values of each expert.
    top = np.sort(scores, axis=1)[:, ::-1][:, :3, :].transpose(0, 2, 1)
    chosen = np.take_along_axis(
        scores.transpose(0, 2, 1), ops.convert_to_numpy(indices), axis=-1
    )
    np.testing.assert_allclose(chosen, top, atol=1e-6)


@pytest.mark.parametrize("placement", ["patch", "masked", "halo"])
def test_channels_first(placement):
    x = random_map()
    last = PatchExpertChoiceMoE(2, 2, 4, expert_filters=3, placement=placement)
    first = PatchExpertChoiceMoE(
        2,
        2,
        4,
        expert_filters=3,
        placement=placement,
        data_format="channels_first",
    )
    last.build(x.shape)
    first.build(np.transpose(x, (0, 3, 1, 2)).shape)
    first.set_weights(last.get_weights())
    out_first = ops.convert_to_numpy(first(np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_allclose(
        np.transpose(out_first, (0, 2, 3, 1)),
        ops.convert_to_numpy(last(x)),
        atol=1e-5,
    )


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_layer_contract(tmp_path, combine):
    run_layer_test(
        PatchExpertChoiceMoE,
        dict(
            num_experts=2,
            patches_per_expert=2,
            patch_size=2,
            expert_filters=3,
            combine=combine,
        ),
        random_map(batch=4, height=4, width=4, channels=2),
        expected_output_shape=(4, 4, 4, 6 if combine == "concat" else 3),
        tmp_path=tmp_path,
    )


def test_layer_contract_with_custom_experts(tmp_path):
    experts = [
        keras.Sequential(
            [
                keras.layers.Conv2D(4, 1, activation="relu"),
                keras.layers.Conv2D(3, 3, padding="same"),
            ]
        )
        for _ in range(2)
    ]
    config_experts = dict(
        num_experts=2, patches_per_expert=2, patch_size=2, experts=experts
    )
    x = random_map(batch=4, height=4, width=4, channels=2)
    layer, _ = run_layer_test(
        PatchExpertChoiceMoE,
        config_experts,
        x,
        expected_output_shape=(4, 4, 4, 6),
        tmp_path=tmp_path,
        run_mixed_precision=False,
    )
    assert layer.expert_layers[0] is experts[0]


@pytest.mark.skipif(
    BACKEND not in ("jax", "tensorflow"), reason="XLA compilation"
)
@pytest.mark.parametrize("placement", ["patch", "masked", "halo"])
def test_compiles_under_xla(placement):
    x = random_map()
    layer = PatchExpertChoiceMoE(
        2,
        2,
        4,
        expert_filters=3,
        expert_use_pre_activation=True,
        placement=placement,
    )
    eager = ops.convert_to_numpy(layer(x))
    if BACKEND == "jax":
        import jax

        values = [v.value for v in layer.trainable_weights]
        statistics = [v.value for v in layer.non_trainable_weights]

        @jax.jit
        def run(values, x):
            return layer.stateless_call(values, statistics, x)[0]

        compiled = run(values, x)
    else:
        import tensorflow as tf

        compiled = tf.function(layer, jit_compile=True)(x)
    np.testing.assert_allclose(to_numpy(compiled), eager, atol=1e-5)


def authors_reference(layer, x, gating="softmax_all"):
    """The authors' WRN-pMoE layer (nowazrabbani/pMoE_CNN), with loops.

    Per expert: routing values from a convolution with the router as a
    kernel of the patch's size and stride, a softmax over all patches (or
    the other gatings), the top `l`; the input map times the gating value
    on the selected patches and zero elsewhere; then the expert, batch
    normalization (inference mode) -> ReLU -> same-padded convolution,
    on that whole masked map.
    """
    x = x.astype("float64")
    batch, height, width, channels = x.shape
    patch_h, patch_w = layer.patch_size
    grid_h, grid_w = height // patch_h, width // patch_w
    per_expert = layer.patches_per_expert
    router = ops.convert_to_numpy(layer.router).astype("float64")
    router = router.reshape(patch_h, patch_w, channels, layer.num_experts)
    outputs = []
    for s, expert in enumerate(layer.expert_layers):
        parts = expert.layers if isinstance(expert, keras.Sequential) else []
        conv = expert.layers[-1] if parts else expert
        expert_out = []
        for b in range(batch):
            values = np.zeros(grid_h * grid_w)
            for row in range(grid_h):
                for col in range(grid_w):
                    window = x[
                        b,
                        row * patch_h : (row + 1) * patch_h,
                        col * patch_w : (col + 1) * patch_w,
                    ]
                    values[row * grid_w + col] = np.sum(window * router[..., s])
            chosen = np.argsort(-values, kind="stable")[:per_expert]
            if gating == "softmax_all":
                gate = softmax(values)[chosen]
            elif gating == "softmax":
                gate = softmax(values[chosen])
            else:
                gate = np.ones(per_expert)
            gate_map = np.zeros((height, width))
            for j, g in zip(chosen, gate):
                row, col = divmod(j, grid_w)
                gate_map[
                    row * patch_h : (row + 1) * patch_h,
                    col * patch_w : (col + 1) * patch_w,
                ] = g
            h = x[b] * gate_map[..., None]
            for part in parts[:-1]:
                if isinstance(part, keras.layers.BatchNormalization):
                    gamma, beta, mean, variance = (
                        ops.convert_to_numpy(w).astype("float64")
                        for w in part.weights
                    )
                    h = (h - mean) / np.sqrt(variance + part.epsilon)
                    h = h * gamma + beta
                else:
                    assert isinstance(part, keras.layers.ReLU)
                    h = np.maximum(h, 0.0)
            kernel = ops.convert_to_numpy(conv.kernel).astype("float64")
            bias = ops.convert_to_numpy(conv.bias).astype("float64")
            expert_out.append(
                conv2d_reference(h[None], kernel, bias, padding="same")[0]
            )
        outputs.append(np.stack(expert_out))
    if layer.combine == "concat":
        return np.concatenate(outputs, axis=-1)
    return np.sum(outputs, axis=0)


def expert_pixels(layer, indices, height, width):
    """`(batch, k, height, width)`: True on the patches each expert
    selected."""
    patch_h, patch_w = layer.patch_size
    grid_w = width // patch_w
    batch, num_experts, _ = indices.shape
    mask = np.zeros((batch, num_experts, height, width), bool)
    for b in range(batch):
        for s in range(num_experts):
            for j in indices[b, s]:
                row, col = divmod(int(j), grid_w)
                mask[
                    b,
                    s,
                    row * patch_h : (row + 1) * patch_h,
                    col * patch_w : (col + 1) * patch_w,
                ] = True
    return mask


def selected_outputs(layer, indices, height, width):
    """Where the output holds only experts that selected the position:
    with `"concat"`, each expert's channels on its selected patches; with
    `"sum"`, the positions every expert selected. Also where no expert
    contributes at all."""
    pixels = expert_pixels(layer, indices, height, width)
    channels = layer.expert_channels
    if layer.combine == "concat":
        selected = np.repeat(np.moveaxis(pixels, 1, -1), channels, axis=-1)
        return selected, ~selected
    shape = (*pixels.shape[:1], height, width, channels)
    every = np.broadcast_to(pixels.all(axis=1)[..., None], shape)
    none = np.broadcast_to(~pixels.any(axis=1)[..., None], shape)
    return every, none


def authors_layer(placement, kernel_size=3, gating="softmax_all", **kwargs):
    """A layer with the authors' experts and random batch-norm statistics
    and biases, so that a zero input gives a non-zero output."""
    x = random_map(batch=2, height=8, width=8, channels=3)
    config = dict(
        num_experts=2,
        patches_per_expert=3,
        patch_size=(2, 4),
        expert_filters=4,
        expert_kernel_size=kernel_size,
        expert_use_pre_activation=True,
        placement=placement,
        gating=gating,
        router_initializer=keras.initializers.RandomNormal(stddev=0.3),
    )
    layer = PatchExpertChoiceMoE(**{**config, **kwargs})
    layer.build(x.shape)
    rng = np.random.default_rng(7)
    for expert in layer.expert_layers:
        bn, _, conv = expert.layers
        bn.gamma.assign(rng.uniform(0.5, 1.5, size=3))
        bn.beta.assign(rng.normal(size=3))
        bn.moving_mean.assign(rng.normal(size=3))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3))
        conv.bias.assign(rng.normal(size=4))
    return layer, x


AUTHORS_CASES = [
    ("softmax_all", "concat", 3),
    ("softmax", "sum", 3),
    ("hard", "concat", 1),
    ("softmax_all", "concat", (3, 5)),
]


@pytest.mark.parametrize("gating, combine, kernel_size", AUTHORS_CASES)
def test_masked_placement_is_the_authors_computation(
    gating, combine, kernel_size
):
    layer, x = authors_layer(
        "masked", kernel_size=kernel_size, gating=gating, combine=combine
    )
    expected = authors_reference(layer, x, gating)
    outputs = ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    # Positions no expert selected are not zero: the expert's response to
    # a zero input and to neighbouring selected pixels.
    indices = ops.convert_to_numpy(layer.route(x)["indices"])
    _, unselected = selected_outputs(layer, indices, 8, 8)
    assert np.mean(np.abs(expected[unselected]) > 1e-3) > 0.5


@pytest.mark.parametrize("gating, combine, kernel_size", AUTHORS_CASES)
def test_halo_placement_matches_the_authors_on_selected_patches(
    gating, combine, kernel_size
):
    layer, x = authors_layer(
        "halo", kernel_size=kernel_size, gating=gating, combine=combine
    )
    expected = authors_reference(layer, x, gating)
    outputs, routing = layer(x, return_routing=True, training=False)
    outputs = ops.convert_to_numpy(outputs)
    indices = ops.convert_to_numpy(routing["indices"])
    selected, unselected = selected_outputs(layer, indices, 8, 8)
    assert np.any(selected) and np.any(unselected)
    np.testing.assert_allclose(
        outputs[selected], expected[selected], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(outputs[unselected], 0.0)
    # Eq. 1's placement (each patch alone, gate after the expert) differs
    # from the authors' on the same selected patches, except with gates of
    # 1 and 1x1 kernels.
    if gating == "hard" and kernel_size == 1:
        return
    eq1 = PatchExpertChoiceMoE.from_config(
        {**layer.get_config(), "placement": "patch"}
    )
    eq1.build(x.shape)
    eq1.set_weights(layer.get_weights())
    eq1_out = ops.convert_to_numpy(eq1(x, training=False))
    assert np.max(np.abs(eq1_out - expected)[selected]) > 1e-2


class RecordingBatchNormalization(keras.layers.BatchNormalization):
    """A batch normalization that records the shape of every batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_shapes = []

    def call(self, inputs, training=None):
        self.seen_shapes.append(tuple(inputs.shape))
        return super().call(inputs, training=training)


@pytest.mark.parametrize(
    "placement, seen",
    [
        # The whole 16x16 map.
        ("masked", (2, 16, 16, 3)),
        # batch * l windows: 4x4 patches with a 1-pixel halo for 3x3.
        ("halo", (2 * 2, 6, 6, 3)),
    ],
)
def test_where_the_experts_run(placement, seen):
    x = random_map(batch=2, height=16, width=16, channels=3)
    experts = [
        keras.Sequential(
            [
                RecordingBatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.Conv2D(4, 3, padding="same"),
            ]
        )
        for _ in range(4)
    ]
    layer = PatchExpertChoiceMoE(
        num_experts=4,
        patches_per_expert=2,
        patch_size=4,
        experts=experts,
        placement=placement,
    )
    assert tuple(layer(x).shape) == (2, 16, 16, 16)
    for expert in experts:
        assert expert.layers[0].seen_shapes == [seen]


def test_ties_go_to_the_lower_patch_index():
    # Integer maps and routers: routing values are exact integers, with
    # ties, on every backend.
    values = np.array(
        [[3, 5, 5, 1, 5, 2, 5, 0, 3], [4, 4, 4, 4, 4, 4, 4, 4, 4]], "float32"
    )
    x = np.stack([values, -values], axis=-1).reshape(2, 3, 3, 2)
    layer = PatchExpertChoiceMoE(
        num_experts=3,
        patches_per_expert=4,
        patch_size=1,
        expert_filters=2,
        expert_kernel_size=1,
        gating="softmax_all",
    )
    layer.build(x.shape)
    # Expert 0 scores the values, expert 1 their negatives (1x1 patches of
    # 2 channels: (value, -value)), expert 2 scores every patch 0.
    layer.router.assign(np.array([[1, -1, 0], [0, 0, 0]], "float32"))
    routing = layer.route(x)
    scores = ops.convert_to_numpy(routing["routing_values"])
    expected = np.argsort(-scores.transpose(0, 2, 1), kind="stable")[..., :4]
    np.testing.assert_array_equal(
        ops.convert_to_numpy(routing["indices"]), expected
    )
    np.testing.assert_array_equal(
        expected[0], [[1, 2, 4, 6], [7, 3, 5, 0], [0, 1, 2, 3]]
    )
    # Equal values, equal gates; the outputs follow the same patches.
    gates = ops.convert_to_numpy(routing["gates"])
    np.testing.assert_allclose(gates[1], np.full((3, 4), 1 / 9), rtol=1e-6)
    for placement in ("patch", "halo"):
        tied = PatchExpertChoiceMoE.from_config(
            {**layer.get_config(), "placement": placement}
        )
        tied.build(x.shape)
        tied.set_weights(layer.get_weights())
        outputs = ops.convert_to_numpy(tied(x))
        zero = np.all(outputs.reshape(2, 9, 3, 2) == 0, axis=-1)
        # Expert 2 (all scores equal) fills patches 0-3 of both maps.
        np.testing.assert_array_equal(zero[:, :, 2], [np.arange(9) >= 4] * 2)


@pytest.mark.parametrize("placement", ["patch", "masked", "halo"])
@pytest.mark.parametrize(
    "shape, received",
    [
        ((2, 16, 16, 3), "height 16, width 16 and 3 channels"),
        ((2, 8, 8, 5), "height 8, width 8 and 5 channels"),
    ],
)
def test_inputs_of_another_size_than_built_are_rejected(
    placement, shape, received
):
    layer = PatchExpertChoiceMoE(2, 2, 4, expert_filters=4, placement=placement)
    layer(random_map(batch=2, height=8, width=8, channels=3))
    built = "built for inputs of height 8, width 8 and 3 channels"
    x = np.zeros(shape, "float32")
    for run in (layer, layer.route):
        with pytest.raises(ValueError, match=built) as error:
            run(x)
        assert received in str(error.value)
    with pytest.raises(ValueError, match=received):
        layer(keras.Input(shape[1:]))


@pytest.mark.parametrize("placement", ["masked", "halo"])
def test_layer_contract_with_the_authors_experts(tmp_path, placement):
    run_layer_test(
        PatchExpertChoiceMoE,
        dict(
            num_experts=2,
            patches_per_expert=2,
            patch_size=2,
            expert_filters=3,
            expert_use_pre_activation=True,
            expert_batch_norm_momentum=0.9,
            expert_batch_norm_epsilon=1e-5,
            placement=placement,
            gating="softmax_all",
            router_initializer=keras.initializers.RandomNormal(stddev=1e-4),
            expert_kernel_initializer="glorot_uniform",
        ),
        random_map(batch=4, height=4, width=4, channels=2),
        expected_output_shape=(4, 4, 4, 6),
        tmp_path=tmp_path,
    )


def test_halo_layer_contract_with_custom_experts(tmp_path):
    experts = [
        keras.Sequential(
            [
                keras.layers.LayerNormalization(),
                keras.layers.Activation("gelu"),
                keras.layers.Conv2D(3, 3, padding="same", dilation_rate=2),
            ]
        ),
        keras.layers.Conv2D(3, (1, 3), padding="same", activation="relu"),
    ]
    run_layer_test(
        PatchExpertChoiceMoE,
        dict(
            num_experts=2,
            patches_per_expert=2,
            patch_size=2,
            experts=experts,
            placement="halo",
            combine="sum",
        ),
        random_map(batch=4, height=4, width=4, channels=2),
        expected_output_shape=(4, 4, 4, 3),
        tmp_path=tmp_path,
        run_mixed_precision=False,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=0), "num_experts=0"),
        (dict(patches_per_expert=-1), "patches_per_expert=-1"),
        (dict(patch_size=0), "patch_size=0"),
        (dict(patch_size=(2, 2, 2)), "patch_size"),
        (dict(expert_filters=0), "expert_filters=0"),
        (dict(gating="top1"), "gating='top1'"),
        (dict(combine="mean"), "combine='mean'"),
        (dict(expert_filters=None), "expert_filters"),
        (
            dict(experts=[keras.layers.Conv2D(2, 1)]),
            "experts",
        ),
        (dict(experts=["conv", "conv"], expert_filters=None), "experts"),
        (dict(data_format="NHWC"), "data_format"),
        (dict(placement="dense"), "placement='dense'"),
        (dict(expert_use_bias=1), "expert_use_bias=1"),
        (
            dict(expert_use_pre_activation="yes"),
            "expert_use_pre_activation='yes'",
        ),
        (
            dict(expert_batch_norm_momentum=1.5),
            "expert_batch_norm_momentum=1.5",
        ),
        (dict(expert_batch_norm_epsilon=0), "expert_batch_norm_epsilon=0"),
        (
            dict(
                placement="halo",
                experts=[
                    keras.layers.Conv2D(2, 3, padding="same"),
                    keras.layers.Conv2D(2, 3, name="valid_conv"),
                ],
            ),
            "expert 1 \\('valid_conv'\\) is not.*padding='valid'",
        ),
        (
            dict(
                placement="halo",
                experts=[
                    keras.layers.Conv2D(2, 3, strides=2, padding="same"),
                    keras.layers.Conv2D(2, 3, padding="same"),
                ],
            ),
            "strides=\\(2, 2\\)",
        ),
        (
            dict(
                placement="halo",
                experts=[
                    keras.Sequential(
                        [
                            keras.layers.MaxPooling2D(
                                3, 1, "same", name="pool"
                            ),
                            keras.layers.Conv2D(2, 3, padding="same"),
                        ]
                    ),
                    keras.layers.Conv2D(2, 3, padding="same"),
                ],
            ),
            "'pool' \\(MaxPooling2D\\) is not a position-wise layer",
        ),
        (
            dict(
                placement="halo",
                experts=[keras.layers.Dense(2), keras.layers.Dense(2)],
            ),
            "does not end in a Conv2D",
        ),
    ],
)
def test_invalid_arguments(kwargs, match):
    base = dict(
        num_experts=2, patches_per_expert=2, patch_size=2, expert_filters=3
    )
    if "experts" in kwargs:
        base.pop("expert_filters")
    with pytest.raises(ValueError, match=match):
        PatchExpertChoiceMoE(**{**base, **kwargs})


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(patch_size=3), (2, 8, 8, 4), "patch_size=\\(3, 3\\)"),
        (dict(patches_per_expert=5), (2, 4, 4, 4), "patches_per_expert=5"),
        (dict(), (2, 8, 4), "inputs_shape=\\(2, 8, 4\\)"),
        (
            dict(
                experts=[
                    keras.layers.Conv2D(3, 3),
                    keras.layers.Conv2D(3, 3),
                ],
                expert_filters=None,
                patch_size=4,
            ),
            (2, 8, 8, 4),
            "same height and width",
        ),
        (
            dict(
                experts=[
                    keras.layers.Conv2D(3, 1),
                    keras.layers.Conv2D(4, 1),
                ],
                expert_filters=None,
            ),
            (2, 8, 8, 4),
            "same number of output channels",
        ),
    ],
)
def test_invalid_inputs(kwargs, shape, match):
    base = dict(
        num_experts=2, patches_per_expert=2, patch_size=2, expert_filters=3
    )
    layer = PatchExpertChoiceMoE(**{**base, **kwargs})
    with pytest.raises(ValueError, match=match):
        layer(np.zeros(shape, "float32"))


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch.export only"
)
@pytest.mark.parametrize(
    "gating, combine, placement",
    [
        ("softmax", "concat", "patch"),
        ("softmax_all", "sum", "patch"),
        ("hard", "concat", "patch"),
        ("softmax_all", "concat", "masked"),
        ("softmax_all", "concat", "halo"),
    ],
)
def test_torch_export_keeps_the_batch_size_dynamic(
    tmp_path, gating, combine, placement
):
    import torch

    inputs = keras.Input((8, 8, 4))
    outputs, routing = PatchExpertChoiceMoE(
        num_experts=3,
        patches_per_expert=2,
        patch_size=2,
        expert_filters=5,
        expert_use_pre_activation=placement != "patch",
        placement=placement,
        gating=gating,
        combine=combine,
    )(inputs, return_routing=True)
    model = keras.Model(inputs, {"outputs": outputs, **routing})
    path = str(tmp_path / "pmoe.pt2")
    batch = torch.export.Dim("batch", min=1, max=64)
    model.export(path, format="torch", verbose=False, dynamic_shapes={0: batch})
    program = torch.export.load(path).module()
    rng = np.random.default_rng(0)
    for size in (1, 3, 7):
        x = rng.normal(size=(size, 8, 8, 4)).astype("float32")
        with torch.no_grad():
            exported = program(torch.from_numpy(x))
        expected = to_numpy(model(x))
        np.testing.assert_array_equal(
            to_numpy(exported["indices"]), expected["indices"]
        )
        for key in ("outputs", "gates", "routing_values"):
            np.testing.assert_allclose(
                to_numpy(exported[key]), expected[key], atol=1e-5
            )
