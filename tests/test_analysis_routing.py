import warnings

import keras
import numpy as np
import pytest

from keras_moe import analysis
from keras_moe.layers import GatedConv2D
from keras_moe.layers import MixtureOfExperts
from keras_moe.layers import PatchExpertChoiceMoE
from keras_moe.layers import ShallowEmbedding
from keras_moe.layers import SparseGatingHeads


def tiny_deepmoe(gate_initializer=None):
    """A small network following the DeepMoE output contract."""
    inputs = keras.Input((8, 8, 3))
    e = ShallowEmbedding(4, num_layers=2, filters=4)(inputs)
    g1, g2 = SparseGatingHeads([4, 6], kernel_initializer=gate_initializer)(e)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = GatedConv2D(6, 3, padding="same", activation="relu")(x, g1)
    x = GatedConv2D(5, 3, padding="same", activation="relu")(x, g2)
    logits = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, {"logits": logits, "gates": [g1, g2]})


def test_gate_statistics_by_hand():
    gates = [
        np.array(
            [[0.0, 2.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0], [0.0, 4.0, 1.0]]
        ),
        np.array([[1.0], [0.0], [0.0], [2.0]]),
    ]
    labels = np.array([0, 1, 0, 1])
    stats = analysis.gate_statistics(gates, labels, ["a", "b"], bins=4)
    np.testing.assert_allclose(stats.density, [5 / 12, 0.5])
    np.testing.assert_allclose(stats.mean_gate, [11 / 12, 0.75])
    np.testing.assert_allclose(stats.dead_fraction, [1 / 3, 0.0])
    np.testing.assert_allclose(stats.collapsed_fraction, [0.25, 0.5])
    assert stats.overall_density == pytest.approx(7 / 16)
    assert stats.histograms[0][0].sum() == 12
    np.testing.assert_allclose(
        stats.class_patterns[0], [[0.0, 1.0, 0.0], [0.0, 2.5, 2.0]]
    )
    scalars = stats.as_scalars()
    assert scalars["gate_density/b"] == 0.5
    assert scalars["dead_channels/a"] == pytest.approx(1 / 3)


def test_gate_statistics_rejects_bad_input():
    with pytest.raises(ValueError, match="same examples"):
        analysis.gate_statistics([np.zeros((3, 2)), np.zeros((4, 2))])
    with pytest.raises(ValueError, match="labels"):
        analysis.gate_statistics([np.zeros((3, 2))], labels=[0, 1])
    with pytest.raises(ValueError, match="num_examples"):
        analysis.gate_statistics([np.zeros(3)])


def test_expert_load_by_hand():
    load = analysis.expert_load([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    np.testing.assert_allclose(load["mean_gate"], [0.4, 0.5, 0.1])
    np.testing.assert_allclose(load["top_fraction"], [0.5, 0.5, 0.0])


def test_patch_routing_statistics_by_hand():
    # 2 examples, 2 experts, 2 patches each, on a 2x2 grid.
    indices = np.array([[[0, 1], [1, 2]], [[0, 1], [0, 1]]])
    gates = np.array([[[0.6, 0.4], [0.9, 0.1]], [[0.5, 0.5], [0.7, 0.3]]])
    stats = analysis.patch_routing_statistics(
        indices, gates, (2, 2), labels=[0, 1]
    )
    np.testing.assert_array_equal(
        stats.selection_counts, [[[2, 2], [0, 0]], [[1, 2], [1, 0]]]
    )
    assert stats.coverage == pytest.approx((3 / 4 + 2 / 4) / 2)
    # Jaccard: example 0 -> {0,1} vs {1,2} = 1/3; example 1 -> 1.
    assert stats.overlap[0, 1] == pytest.approx((1 / 3 + 1) / 2)
    np.testing.assert_allclose(np.diag(stats.overlap), 1.0)
    assert stats.position_entropy[0] == pytest.approx(np.log(2) / np.log(4))
    np.testing.assert_allclose(stats.mean_gate_by_rank[0], [0.55, 0.45])
    assert stats.class_selection.shape == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="grid_shape"):
        analysis.patch_routing_statistics(indices + 3, gates, (2, 2))


def test_collect_gates_from_arrays_and_datasets():
    model = tiny_deepmoe()
    x = np.random.default_rng(0).random((10, 8, 8, 3)).astype("float32")
    y = np.arange(10) % 3
    gates, labels = analysis.collect_gates(model, (x, y), batch_size=4)
    assert [g.shape for g in gates] == [(10, 4), (10, 6)]
    np.testing.assert_array_equal(labels, y)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    again, _ = analysis.collect_gates(model, batches)
    np.testing.assert_allclose(again[1], gates[1], atol=1e-6)
    with pytest.raises(ValueError, match="gate_fn"):
        analysis.collect_gates(keras.Sequential([keras.layers.Dense(2)]), x)


def test_collect_routing_matches_the_layer():
    inputs = keras.Input((8, 8, 2))
    features = keras.layers.Conv2D(4, 1)(inputs)
    moe = PatchExpertChoiceMoE(3, 2, 4, expert_filters=2, name="moe")
    model = keras.Model(inputs, moe(features))
    x = np.random.default_rng(1).random((5, 8, 8, 2)).astype("float32")
    routing, labels = analysis.collect_routing(model, "moe", x, batch_size=2)
    assert labels is None
    assert routing["indices"].shape == (5, 3, 2)
    direct = moe.route(model.layers[1](x))
    np.testing.assert_array_equal(
        routing["indices"], keras.ops.convert_to_numpy(direct["indices"])
    )


def test_gate_embedding_shuffling():
    # Classes 0, 1 form group A and 2, 3 group B. The classifier reads
    # only the group from the embedding and the class-within-group from x.
    y = np.repeat(np.arange(4), 5)
    x = (y % 2).astype("float32")[:, None]
    groups = {0: "A", 1: "A", 2: "B", 3: "B"}

    def embed(x_batch):
        return np.eye(2)[(y >= 2).astype(int)]

    def classify(x_batch, e):
        group = np.argmax(e, axis=1)
        return np.eye(4)[2 * group + x_batch[:, 0].astype(int)]

    result = analysis.gate_embedding_shuffling(
        embed, classify, x, y, target_class=1, groups=groups, num_repeats=3
    )
    assert result["own"] == 1.0
    assert result["accuracy"] == {0: 1.0, 2: 0.0, 3: 0.0}
    assert (result["in_group"], result["out_of_group"]) == (1.0, 0.0)


def fit_with_monitor(model, monitor, x, y):
    model.compile(
        keras.optimizers.SGD(0.0),
        loss={
            "logits": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            )
        }
        if isinstance(model.output, dict)
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    target = {"logits": y} if isinstance(model.output, dict) else y
    return model.fit(x, target, epochs=2, verbose=0, callbacks=[monitor])


def test_monitor_logs_and_warns_on_gate_collapse():
    x = np.random.default_rng(2).random((12, 8, 8, 3)).astype("float32")
    y = np.arange(12) % 3
    model = tiny_deepmoe(gate_initializer="zeros")
    monitor = analysis.RoutingMonitor(x[:6])
    with pytest.warns(analysis.RoutingCollapseWarning, match="Gate collapse"):
        history = fit_with_monitor(model, monitor, x, y)
    assert history.history["routing/gate_density"] == [0.0, 0.0]
    assert "routing/gate_density/layer_1" in history.history
    assert len(monitor.history) == 2


def test_monitor_is_quiet_on_a_healthy_network():
    x = np.random.default_rng(3).random((12, 8, 8, 3)).astype("float32")
    monitor = analysis.RoutingMonitor(x[:6], every_n_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", analysis.RoutingCollapseWarning)
        history = fit_with_monitor(
            tiny_deepmoe(), monitor, x, np.arange(12) % 3
        )
    assert history.history["routing/gate_density"] == [1.0]
    assert [h["epoch"] for h in monitor.history] == [1]


def test_monitor_warns_on_expert_collapse():
    inputs = keras.Input((6,))
    moe = MixtureOfExperts(3, expert_units=4, name="mixture")
    logits = keras.layers.Dense(2)(moe(inputs))
    model = keras.Model(inputs, logits)
    model(np.zeros((1, 6), "float32"))
    bias = np.array([5.0, 5.0, -10.0], "float32")
    moe.gate_logits.bias.assign(bias)
    x = np.random.default_rng(4).random((8, 6)).astype("float32")
    monitor = analysis.RoutingMonitor(x)
    with pytest.warns(analysis.RoutingCollapseWarning, match="expert 2"):
        history = fit_with_monitor(model, monitor, x, np.arange(8) % 2)
    assert history.history["routing/mixture/expert_2_load"][0] < 0.01


def test_monitor_warns_on_redundant_patch_experts():
    inputs = keras.Input((8, 8, 2))
    moe = PatchExpertChoiceMoE(
        2, 2, 4, expert_filters=2, router_initializer="ones", name="pmoe"
    )
    pooled = keras.layers.GlobalAveragePooling2D()(moe(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(pooled))
    x = np.random.default_rng(5).random((6, 8, 8, 2)).astype("float32")
    monitor = analysis.RoutingMonitor(x)
    with pytest.warns(analysis.RoutingCollapseWarning, match="Redundant"):
        history = fit_with_monitor(model, monitor, x, np.arange(6) % 2)
    assert history.history["routing/pmoe/mean_overlap"][0] == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(every_n_epochs=0),
        dict(collapse_threshold=1.5),
        dict(overlap_threshold=0),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        analysis.RoutingMonitor(np.zeros((2, 2)), **kwargs)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(6)
    gates = [np.maximum(rng.normal(size=(20, 8)), 0) for _ in range(3)]
    stats = analysis.gate_statistics(gates, labels=np.arange(20) % 4)
    indices = np.stack(
        [rng.permutation(16)[:4].reshape(2, 2) for _ in range(5)]
    )
    routing = analysis.patch_routing_statistics(
        indices, np.full(indices.shape, 0.5), (4, 4)
    )
    figures = {
        "density.png": lambda p: analysis.plot_gate_density(stats, p),
        "hist.png": lambda p: analysis.plot_gate_histograms(stats, p),
        "class.png": lambda p: analysis.plot_class_gate_patterns(stats, 0, p),
        "load.png": lambda p: analysis.plot_expert_load(
            analysis.expert_load(rng.dirichlet(np.ones(3), 10)), p
        ),
        "freq.png": lambda p: analysis.plot_selection_frequency(routing, p),
        "patches.png": lambda p: analysis.plot_patch_selection(
            rng.random((32, 32)), indices[0], (4, 4), p
        ),
    }
    import matplotlib.pyplot as plt

    for name, draw in figures.items():
        plt.close(draw(str(tmp_path / name)))
        assert (tmp_path / name).stat().st_size > 2000, name


def test_patch_selection_draws_a_panel_per_expert():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    # Experts 1 and 2 share patch 5: each panel outlines its own patches.
    indices = np.array([[0, 5], [5, 15], [5, 0]])
    fig = analysis.plot_patch_selection(
        np.random.default_rng(0).random((32, 32, 3)),
        indices,
        (4, 4),
        title="patches picked by each expert",
    )
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == [
        "expert 0",
        "expert 1",
        "expert 2",
    ]
    for ax, chosen in zip(panels, indices):
        corners = sorted(tuple(p.get_xy()) for p in ax.patches)
        expected = [(8 * (j % 4) - 0.5, 8 * (j // 4) - 0.5) for j in chosen]
        assert corners == sorted(expected)
        assert all(p.get_width() == p.get_height() == 8 for p in ax.patches)
    plt.close(fig)
