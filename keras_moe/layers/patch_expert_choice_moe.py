import keras
import numpy as np
from keras import ops

from keras_moe.layers._validation import check_choice
from keras_moe.layers._validation import check_momentum
from keras_moe.layers._validation import check_positive_int
from keras_moe.layers._validation import check_positive_number
from keras_moe.layers._validation import check_rank
from keras_moe.layers._validation import independent_initializer
from keras_moe.layers._validation import standardize_data_format

GATING_MODES = ("softmax", "hard", "softmax_all")
COMBINE_MODES = ("concat", "sum")
PLACEMENTS = ("patch", "masked", "halo")

# Layers that act on every position of a map on its own, so that running
# them on a window of the map gives the window of running them on the map.
_POINTWISE_LAYERS = (
    keras.layers.Activation,
    keras.layers.BatchNormalization,
    keras.layers.Dropout,
    keras.layers.ELU,
    keras.layers.Identity,
    keras.layers.LayerNormalization,
    keras.layers.LeakyReLU,
    keras.layers.ReLU,
)


@keras.saving.register_keras_serializable(package="keras_moe")
class PatchExpertChoiceMoE(keras.layers.Layer):
    """Patch-level mixture of experts with expert-choice routing (pMoE).

    The feature map is cut into `n` non-overlapping patches `x^(j)` of size
    `patch_size`. Each of the `num_experts` experts (`k`) has a router
    `w_s` without bias that scores every patch, `r_{s,j} = <w_s, x^(j)>`,
    and picks its top `patches_per_expert` (`l`) patches `J_s(x)`. Equal
    routing values are ranked by patch index, lower first, on every
    backend, so that the same weights select the same patches everywhere.

    Gating values:

    - `"softmax"`: softmax over the `l` selected routing values of each
      expert (joint training, pMoE eq. 4). Routers get gradient, except
      with `patches_per_expert=1`, where every gate is identically 1.
    - `"hard"`: `G_{j,s} = 1` (separate training, pMoE eq. 3). Routers get
      no gradient through the layer's output.
    - `"softmax_all"`: softmax over all `n` routing values of each expert,
      then the values of the selected patches; this is what the authors'
      public code does.

    Where the experts run (`placement`):

    - `"patch"` (pMoE eq. 1): only the selected patches are gathered, each
      is run through the expert on its own (a convolution sees zero
      padding at the patch border), scaled by its gating value and
      scattered back to its place. Every position that an expert did not
      select is zero in that expert's output. The experts do `l / n` of
      the work of running them on the whole map.
    - `"masked"` (the authors' public code, nowazrabbani/pMoE_CNN): the
      input map is multiplied by each expert's gate map (the gating value
      on its selected patches, zero elsewhere) and the expert runs on the
      whole masked map. A convolution then sees the pixels of neighbouring
      selected patches across a patch border, and unselected patches get
      the expert's response to a zero input (a batch normalization's
      shift, a bias) and to nearby selected pixels. This costs as much as
      running every expert on the dense map; it exists to reproduce the
      authors' results.
    - `"halo"`: the efficient equivalent of `"masked"`. Each selected
      patch is gathered from the masked map together with a halo of the
      pixels the expert's convolution reaches beyond it
      (`(kernel_size - 1) / 2` on each side for odd kernels), zero outside
      the map after the expert's position-wise layers, as the convolution's
      own padding is in the authors' code. On the selected patches the
      output equals `"masked"`'s in inference mode; in training mode batch
      normalization takes its batch statistics over the gathered windows
      instead of the whole masked map, so it differs. Unselected positions
      are zero, as with `"patch"`. The experts' convolutions do `l / n` of
      the work of running them on the whole map; the position-wise layers
      run on the windows, halo included.

    The experts' outputs are combined by `"concat"` (along channels, as in
    the authors' WRN-pMoE, giving `k * expert_channels` channels) or
    `"sum"`. Routing runs in float32, also under mixed precision.

    Each expert is by default a same-padded `Conv2D` with `expert_filters`
    filters and `expert_kernel_size` kernel, preceded by batch
    normalization and ReLU with `expert_use_pre_activation=True` (the
    experts of the authors' WRN-pMoE). Any Keras layer or small model can
    be given instead through `experts`; experts always see channels-last
    input. With `"patch"` an expert maps `(batch, ph, pw, channels)`
    patches to `(batch, ph, pw, expert_channels)`, with `"masked"` it maps
    the `(batch, height, width, channels)` map to the same height and
    width. With `"halo"` an expert is a `Conv2D` (strides 1, `"same"`
    padding, channels-last), or a `keras.Sequential` of position-wise
    layers (batch or layer normalization over channels, activations,
    dropout) ending in such a `Conv2D`: the layer runs the position-wise
    layers on the windows and the convolution's weights with `"valid"`
    padding.

    The selection is `keras.ops.top_k`, which models holding the layer take
    into `model.export()`. A SavedModel exported from JAX 0.10 holds it as
    a StableHLO composite (`vhlo.composite_v2`) that the XLA of TensorFlow
    2.21 cannot read, so that artifact fails when it runs, not because of
    this layer: export from the TensorFlow backend instead (a `.keras` file
    loads on every backend), or with `format="torch"` from PyTorch.

    Args:
        num_experts: int, the number of experts and routers `k`.
        patches_per_expert: int, the number of patches `l` each expert
            selects; at most the number of patches `n`.
        patch_size: int or tuple of 2 ints, the patch height and width; must
            divide the feature map's height and width.
        expert_filters: int, the output channels of each default expert.
            Give either this or `experts`.
        expert_kernel_size: int or tuple of 2 ints, the kernel size of the
            default experts. Defaults to 3.
        experts: optional list of `num_experts` Keras layers to use as the
            experts instead of the default ones.
        placement: one of `"patch"` (default), `"masked"`, `"halo"`: where
            the gates act and the experts run, see above.
        gating: one of `"softmax"`, `"hard"`, `"softmax_all"`.
        combine: `"concat"` or `"sum"`.
        expert_use_bias: bool, whether the default experts' convolutions
            have a bias.
        expert_use_pre_activation: bool, whether the default experts run
            batch normalization and ReLU before their convolution.
        expert_batch_norm_momentum: float, the momentum of the default
            experts' batch normalization. Defaults to Keras' 0.99.
        expert_batch_norm_epsilon: float, its epsilon. Defaults to Keras'
            0.001.
        router_initializer: initializer of the router kernels `w_s`.
        expert_kernel_initializer: initializer of the default experts'
            kernels.
        router_regularizer: optional regularizer of the router kernels.
        expert_kernel_regularizer: optional regularizer of the default
            experts' kernels.
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            `keras.config.image_data_format()`.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: 4D feature map of the height, width and channels the layer
            was built for.
        return_routing: bool. When `True`, the call returns
            `(outputs, routing)` where `routing` is the dict returned by
            `route()`.
        training: bool, the mode of the experts' layers (such as batch
            normalization).

    Input shape:
        `(batch, height, width, channels)` with `"channels_last"`; height and
        width must be known.

    Output shape:
        `(batch, height, width, num_experts * expert_channels)` with
        `"concat"`, `(batch, height, width, expert_channels)` with `"sum"`.

    Example:

    ```python
    x = np.random.rand(2, 8, 8, 16).astype("float32")
    moe = keras_moe.layers.PatchExpertChoiceMoE(
        num_experts=4, patches_per_expert=2, patch_size=4,
        expert_filters=8)
    tuple(moe(x).shape)  # (2, 8, 8, 32)
    routing = moe.route(x)
    tuple(routing["indices"].shape)  # (2, 4, 2)
    # The authors' experts (BN -> ReLU -> conv on the masked map),
    # computed on the selected patches and their halo only.
    authors = keras_moe.layers.PatchExpertChoiceMoE(
        num_experts=4, patches_per_expert=2, patch_size=4,
        expert_filters=8, expert_use_pre_activation=True,
        placement="halo", gating="softmax_all")
    tuple(authors(x).shape)  # (2, 8, 8, 32)
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 3.1, eq. 1, 3 and 4; the expert placement of
        their public code, https://github.com/nowazrabbani/pMoE_CNN.
    """

    def __init__(
        self,
        num_experts,
        patches_per_expert,
        patch_size,
        expert_filters=None,
        expert_kernel_size=3,
        experts=None,
        placement="patch",
        gating="softmax",
        combine="concat",
        expert_use_bias=True,
        expert_use_pre_activation=False,
        expert_batch_norm_momentum=0.99,
        expert_batch_norm_epsilon=1e-3,
        router_initializer="glorot_uniform",
        expert_kernel_initializer="he_normal",
        router_regularizer=None,
        expert_kernel_regularizer=None,
        data_format=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.patches_per_expert = check_positive_int(
            "patches_per_expert", patches_per_expert
        )
        self.patch_size = _pair("patch_size", patch_size)
        self.expert_kernel_size = _pair(
            "expert_kernel_size", expert_kernel_size
        )
        if (expert_filters is None) == (experts is None):
            raise ValueError(
                "Give exactly one of `expert_filters` (default convolution "
                "experts) and `experts` (your own expert layers). Received: "
                f"expert_filters={expert_filters!r}, experts={experts!r}"
            )
        if expert_filters is not None:
            check_positive_int("expert_filters", expert_filters)
        self.expert_filters = expert_filters
        self.placement = check_choice("placement", placement, PLACEMENTS)
        if experts is not None:
            if not isinstance(experts, (list, tuple)) or len(experts) != (
                num_experts
            ):
                raise ValueError(
                    "`experts` must be a list of `num_experts` "
                    f"({num_experts}) layers. Received: experts={experts!r}"
                )
            for index, expert in enumerate(experts):
                if not isinstance(expert, keras.layers.Layer):
                    raise ValueError(
                        "Every entry of `experts` must be a Keras layer. "
                        f"Received: experts={experts!r}"
                    )
                if self.placement == "halo":
                    _halo_parts(expert, index)
            experts = list(experts)
        self.experts = experts
        self.gating = check_choice("gating", gating, GATING_MODES)
        self.combine = check_choice("combine", combine, COMBINE_MODES)
        if not isinstance(expert_use_bias, bool):
            raise ValueError(
                "`expert_use_bias` must be a bool. "
                f"Received: expert_use_bias={expert_use_bias!r}"
            )
        self.expert_use_bias = expert_use_bias
        if not isinstance(expert_use_pre_activation, bool):
            raise ValueError(
                "`expert_use_pre_activation` must be a bool. Received: "
                f"expert_use_pre_activation={expert_use_pre_activation!r}"
            )
        self.expert_use_pre_activation = expert_use_pre_activation
        self.expert_batch_norm_momentum = check_momentum(
            "expert_batch_norm_momentum", expert_batch_norm_momentum
        )
        self.expert_batch_norm_epsilon = check_positive_number(
            "expert_batch_norm_epsilon", expert_batch_norm_epsilon
        )
        self.router_initializer = keras.initializers.get(router_initializer)
        self.expert_kernel_initializer = keras.initializers.get(
            expert_kernel_initializer
        )
        self.router_regularizer = keras.regularizers.get(router_regularizer)
        self.expert_kernel_regularizer = keras.regularizers.get(
            expert_kernel_regularizer
        )
        self.data_format = standardize_data_format(data_format)

    def build(self, inputs_shape):
        check_rank(self, "inputs", inputs_shape, 4)
        height, width, channels = self._spatial_shape(inputs_shape)
        if None in (height, width, channels):
            raise ValueError(
                "PatchExpertChoiceMoE needs a known height, width and number "
                f"of channels. Received: inputs_shape={tuple(inputs_shape)}"
            )
        patch_h, patch_w = self.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"`patch_size` must divide the feature map. Received: "
                f"patch_size={self.patch_size} for a {height}x{width} map "
                f"(inputs_shape={tuple(inputs_shape)})"
            )
        self.map_shape = (height, width, channels)
        self.grid_shape = (height // patch_h, width // patch_w)
        self.num_patches = self.grid_shape[0] * self.grid_shape[1]
        if self.patches_per_expert > self.num_patches:
            raise ValueError(
                "`patches_per_expert` cannot exceed the number of patches "
                f"({self.num_patches} for patch_size={self.patch_size} on a "
                f"{height}x{width} map). Received: "
                f"patches_per_expert={self.patches_per_expert}"
            )
        self.patch_dim = patch_h * patch_w * channels
        self.router = self.add_weight(
            name="router",
            shape=(self.patch_dim, self.num_experts),
            initializer=self.router_initializer,
            regularizer=self.router_regularizer,
        )
        if self.experts is None:
            self.expert_layers = [
                self._default_expert(s) for s in range(self.num_experts)
            ]
        else:
            self.expert_layers = self.experts
        if self.placement == "masked":
            expert_shape = (None, height, width, channels)
        else:
            expert_shape = (None, patch_h, patch_w, channels)
        self._halo_windows = []
        expert_channels = set()
        for index, expert in enumerate(self.expert_layers):
            if self.placement == "halo":
                _, conv = _halo_parts(expert, index)
                window_shape, windows = self._halo_window_tables(conv)
                self._halo_windows.append(windows)
                if not expert.built:
                    expert.build((None, *window_shape, channels))
                expert_channels.add(conv.filters)
                continue
            if not expert.built:
                expert.build(expert_shape)
            out_shape = tuple(expert.compute_output_shape(expert_shape))
            if len(out_shape) != 4 or out_shape[1:3] != expert_shape[1:3]:
                raise ValueError(
                    f"With placement={self.placement!r} every expert must "
                    f"map inputs of shape {expert_shape} to outputs of the "
                    f"same height and width. Expert {expert.name!r} gives "
                    f"{out_shape}."
                )
            expert_channels.add(out_shape[-1])
        if len(expert_channels) != 1:
            raise ValueError(
                "All experts must give the same number of output channels. "
                f"Received: {sorted(expert_channels)}"
            )
        self.expert_channels = expert_channels.pop()

    def _default_expert(self, index):
        name = f"expert_{index}"
        conv = keras.layers.Conv2D(
            self.expert_filters,
            self.expert_kernel_size,
            padding="same",
            use_bias=self.expert_use_bias,
            kernel_initializer=independent_initializer(
                self.expert_kernel_initializer, index
            ),
            kernel_regularizer=self.expert_kernel_regularizer,
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="conv" if self.expert_use_pre_activation else name,
        )
        if not self.expert_use_pre_activation:
            return conv
        expert = keras.Sequential(
            [
                keras.layers.BatchNormalization(
                    momentum=self.expert_batch_norm_momentum,
                    epsilon=self.expert_batch_norm_epsilon,
                    dtype=self.dtype_policy,
                    name="bn",
                ),
                keras.layers.ReLU(dtype=self.dtype_policy, name="relu"),
                conv,
            ],
            name=name,
        )
        expert.dtype_policy = self.dtype_policy
        return expert

    def _halo_window_tables(self, conv):
        """Where each patch's window lies in the zero-padded map.

        Returns the window's `(height, width)` and a dict with the halo
        `(top, bottom, left, right)`, `"index"`: int32 `(n, window
        pixels)`, each window pixel's row in the padded map flattened, and
        `"inside"`: float32 of the same shape, 1 where the pixel lies
        inside the map.
        """
        halo = []
        for size, rate in zip(conv.kernel_size, conv.dilation_rate):
            # "same" padding of a stride-1 convolution: the smaller half
            # before, as Keras pads on every backend.
            total = rate * (size - 1)
            halo += [total // 2, total - total // 2]
        top, bottom, left, right = halo
        height, width, _ = self.map_shape
        patch_h, patch_w = self.patch_size
        grid_w = self.grid_shape[1]
        window_h, window_w = patch_h + top + bottom, patch_w + left + right
        padded_w = width + left + right
        rows = np.arange(window_h)
        cols = np.arange(window_w)
        index, inside = [], []
        for j in range(self.num_patches):
            row, col = divmod(j, grid_w)
            r = row * patch_h + rows[:, None]
            c = col * patch_w + cols[None, :]
            index.append((r * padded_w + c).ravel())
            inside.append(
                (
                    (r >= top)
                    & (r < top + height)
                    & (c >= left)
                    & (c < left + width)
                ).ravel()
            )
        return (window_h, window_w), {
            "halo": (top, bottom, left, right),
            "index": np.stack(index).astype("int32"),
            "inside": np.stack(inside).astype("float32"),
        }

    def _spatial_shape(self, shape):
        if self.data_format == "channels_last":
            return shape[1], shape[2], shape[3]
        return shape[2], shape[3], shape[1]

    def _check_inputs_shape(self, inputs_shape):
        """A built layer takes the height, width and channels it was built
        for: its routers, patch grid and experts depend on them."""
        check_rank(self, "inputs", inputs_shape, 4)
        received = tuple(self._spatial_shape(inputs_shape))
        if any(
            r is not None and r != e for r, e in zip(received, self.map_shape)
        ):
            height, width, channels = self.map_shape
            raise ValueError(
                f"Layer {self.name!r} was built for inputs of height "
                f"{height}, width {width} and {channels} channels; it "
                f"received height {received[0]}, width {received[1]} and "
                f"{received[2]} channels. Build a new layer for another "
                f"input size. Received: inputs_shape={tuple(inputs_shape)}"
            )

    @property
    def output_channels(self):
        """Channels of the output: `k * expert_channels` or
        `expert_channels`."""
        if self.combine == "concat":
            return self.num_experts * self.expert_channels
        return self.expert_channels

    def _channels_last(self, inputs):
        if self.data_format == "channels_first":
            return ops.transpose(inputs, (0, 2, 3, 1))
        return inputs

    def _patches(self, x):
        """Returns the patches of a channels-last map as `(batch, n, ph,
        pw, channels)`."""
        grid_h, grid_w = self.grid_shape
        patch_h, patch_w = self.patch_size
        channels = x.shape[-1]
        x = ops.reshape(x, (-1, grid_h, patch_h, grid_w, patch_w, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(
            x, (-1, self.num_patches, patch_h, patch_w, channels)
        )

    def _route(self, patches):
        """The routing dict of `route()` and the selection as a boolean
        `(batch, k, l, n)` tensor, true where rank `r` of expert `s` is
        patch `j`."""
        flat = ops.reshape(patches, (-1, self.num_patches, self.patch_dim))
        routing_values = ops.einsum(
            "bnd,dk->bnk",
            ops.cast(flat, "float32"),
            ops.cast(self.router, "float32"),
        )
        scores = ops.transpose(routing_values, (0, 2, 1))
        selection = self._select(scores)
        # The routing values of the selected patches, rank by rank; a
        # masked sum, so that their gradient reaches the selected patch.
        selected = ops.sum(
            ops.where(selection, scores[:, :, None, :], 0.0), axis=-1
        )
        if self.gating == "hard" or (
            self.gating == "softmax" and self.patches_per_expert == 1
        ):
            # A softmax over a single selected value is identically 1.
            gates = ops.ones_like(selected)
        elif self.gating == "softmax":
            gates = ops.softmax(selected, axis=-1)
        else:
            gates = ops.exp(
                selected - ops.logsumexp(scores, axis=-1, keepdims=True)
            )
        indices = ops.cast(
            ops.argmax(ops.cast(selection, "int32"), axis=-1), "int32"
        )
        routing = {
            "indices": indices,
            "gates": gates,
            "routing_values": routing_values,
        }
        return routing, selection

    def _select(self, scores):
        """Each expert's top `l` patches, equal values ranked by patch
        index.

        `top_k` gives the same values on every backend, but breaks ties
        between patches differently (torch's kernel differs). Here rank `r`
        holding value `v`, the `m`-th rank with that value, takes the
        `m`-th patch (in index order) whose routing value is `v`.
        """
        per_expert = self.patches_per_expert
        values, _ = ops.top_k(scores, per_expert)
        ties = ops.equal(scores[:, :, None, :], values[:, :, :, None])
        seen = ops.cumsum(ops.cast(ties, "int32"), axis=-1)
        earlier = np.tril(np.ones((per_expert, per_expert), "bool"))
        same_value = ops.logical_and(
            ops.equal(values[:, :, :, None], values[:, :, None, :]), earlier
        )
        occurrence = ops.sum(ops.cast(same_value, "int32"), axis=-1)
        return ops.logical_and(ties, ops.equal(seen, occurrence[..., None]))

    def route(self, inputs):
        """Computes the routing decision for `inputs`.

        Args:
            inputs: 4D feature map, as for the call.

        Returns:
            A dict with `"indices"`, int32 `(batch, num_experts,
            patches_per_expert)`: the patches `J_s(x)` each expert selected,
            numbered row-major over the patch grid, highest routing value
            first (equal values: lower patch index first); `"gates"`,
            float32 of the same shape: their gating values `G_{j,s}`; and
            `"routing_values"`, float32 `(batch, num_patches,
            num_experts)`: `r_{s,j} = <w_s, x^(j)>` for every patch.
        """
        if not self.built:
            self.build(tuple(inputs.shape))
        self._check_inputs_shape(tuple(inputs.shape))
        return self._route(self._patches(self._channels_last(inputs)))[0]

    def call(self, inputs, return_routing=False, training=None):
        self._check_inputs_shape(tuple(inputs.shape))
        x = self._channels_last(inputs)
        patches = self._patches(x)
        routing, selection = self._route(patches)
        gates = ops.cast(routing["gates"], self.compute_dtype)
        if self.placement == "patch":
            outputs = self._run_on_patches(patches, selection, gates, training)
        elif self.placement == "masked":
            outputs = self._run_on_masked_map(x, selection, gates, training)
        else:
            outputs = self._run_on_windows(x, selection, gates, training)
        if self.data_format == "channels_first":
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        if return_routing:
            return outputs, routing
        return outputs

    def _run_on_patches(self, patches, selection, gates, training):
        """pMoE eq. 1: each selected patch through the expert on its own,
        scaled by its gate."""
        num_experts = self.num_experts
        per_expert = self.patches_per_expert
        patch_h, patch_w = self.patch_size
        channels = patches.shape[-1]
        # Gather: each expert's selected patches as rows of the (batch * n,
        # patch_dim) patches. (`take_along_axis` broadcasts its indices,
        # which fixes the batch size when torch exports the layer.)
        indices = ops.argmax(ops.cast(selection, "int32"), axis=-1)
        rows = self._batch_offsets(patches) * self.num_patches + indices
        flat_patches = ops.reshape(patches, (-1, self.patch_dim))
        selected = ops.take(flat_patches, ops.reshape(rows, (-1,)), axis=0)
        selected = ops.reshape(
            selected, (-1, num_experts, per_expert, patch_h, patch_w, channels)
        )
        outputs = []
        for s, expert in enumerate(self.expert_layers):
            expert_inputs = ops.reshape(
                selected[:, s], (-1, patch_h, patch_w, channels)
            )
            expert_outputs = ops.cast(
                expert(expert_inputs, training=training), self.compute_dtype
            )
            outputs.append(
                expert_outputs * ops.reshape(gates[:, s], (-1, 1, 1, 1))
            )
        return self._scatter(outputs, selection)

    def _gate_maps(self, selection, gates):
        """`(batch, k, height, width)`: each expert's gating value on the
        pixels of its selected patches, zero elsewhere."""
        grid_h, grid_w = self.grid_shape
        patch_h, patch_w = self.patch_size
        per_patch = ops.sum(
            ops.where(selection, gates[..., None], 0.0),
            axis=2,
        )
        per_patch = ops.reshape(
            per_patch, (-1, self.num_experts, grid_h, 1, grid_w, 1)
        )
        pixels = per_patch * ops.ones(
            (1, 1, 1, patch_h, 1, patch_w), dtype=per_patch.dtype
        )
        return ops.reshape(
            pixels,
            (-1, self.num_experts, grid_h * patch_h, grid_w * patch_w),
        )

    def _run_on_masked_map(self, x, selection, gates, training):
        """The authors' code: each expert on the map times its gate map."""
        gate_maps = self._gate_maps(selection, gates)
        outputs = []
        for s, expert in enumerate(self.expert_layers):
            masked = x * gate_maps[:, s, :, :, None]
            outputs.append(
                ops.cast(expert(masked, training=training), self.compute_dtype)
            )
        if self.combine == "concat":
            return ops.concatenate(outputs, axis=-1)
        return sum(outputs[1:], outputs[0])

    def _run_on_windows(self, x, selection, gates, training):
        """`"masked"` on the selected patches: each one's window of the
        masked map, the position-wise layers, zeros outside the map, then
        the convolution without padding."""
        gate_maps = self._gate_maps(selection, gates)
        indices = ops.argmax(ops.cast(selection, "int32"), axis=-1)
        offsets = self._batch_offsets(x)
        channels = x.shape[-1]
        patch_h, patch_w = self.patch_size
        padded = {}
        outputs = []
        for s, expert in enumerate(self.expert_layers):
            windows = self._halo_windows[s]
            top, bottom, left, right = windows["halo"]
            window_shape = (patch_h + top + bottom, patch_w + left + right)
            padding = ((0, 0), (top, bottom), (left, right))
            if padding not in padded:
                padded[padding] = ops.reshape(
                    ops.pad(x, (*padding, (0, 0))), (-1, channels)
                )
            gate_map = ops.reshape(ops.pad(gate_maps[:, s], padding), (-1,))
            pixels_per_map = (self.map_shape[0] + top + bottom) * (
                self.map_shape[1] + left + right
            )
            rows = offsets * pixels_per_map + ops.take(
                windows["index"], indices[:, s], axis=0
            )
            rows = ops.reshape(rows, (-1,))
            shape = (-1, *window_shape, 1)
            y = ops.reshape(
                ops.take(padded[padding], rows, axis=0),
                (-1, *window_shape, channels),
            )
            y = y * ops.reshape(ops.take(gate_map, rows, axis=0), shape)
            pointwise, conv = _halo_parts(expert, s)
            for layer in pointwise:
                y = layer(y, training=training)
            inside = ops.take(windows["inside"], indices[:, s], axis=0)
            y = y * ops.cast(ops.reshape(inside, shape), y.dtype)
            y = ops.conv(
                y,
                ops.cast(conv.kernel, y.dtype),
                strides=1,
                padding="valid",
                dilation_rate=conv.dilation_rate,
                data_format="channels_last",
            )
            if conv.use_bias:
                y = y + ops.cast(conv.bias, y.dtype)
            if conv.activation is not None:
                y = conv.activation(y)
            outputs.append(ops.cast(y, self.compute_dtype))
        return self._scatter(outputs, selection)

    def _batch_offsets(self, x):
        """`(batch, 1, 1)`: each example's index."""
        return ops.arange(ops.shape(x)[0], dtype="int32")[:, None, None]

    def _scatter(self, expert_outputs, selection):
        """Puts each expert's outputs, `(batch * l, ph, pw, channels)` in
        rank order, at its selected patches; zero elsewhere."""
        num_experts = self.num_experts
        per_expert = self.patches_per_expert
        patch_h, patch_w = self.patch_size
        patch_out = patch_h * patch_w * self.expert_channels
        updates = [
            ops.reshape(o, (-1, per_expert, patch_out)) for o in expert_outputs
        ]
        # A row of zeros for the patches an expert did not select, then the
        # rows ordered (example, expert, rank) like the selection.
        updates = ops.reshape(ops.stack(updates, axis=1), (-1, patch_out))
        updates = ops.concatenate(
            [ops.zeros((1, patch_out), dtype=updates.dtype), updates], axis=0
        )
        # Combine with a gather: for every example, expert and patch, the
        # row of that expert's output for the patch, or the zero row. (A
        # scatter-add into the map does the same, but torch exports Keras's
        # segment sum for the traced batch size only.)
        chosen = ops.cast(selection, "int32")
        rank = ops.cast(ops.argmax(chosen, axis=2), "int32")
        expert_ids = ops.arange(num_experts, dtype="int32")[None, :, None]
        offsets = self._batch_offsets(selection)
        rows = (offsets * num_experts + expert_ids) * per_expert + rank + 1
        rows = rows * ops.max(chosen, axis=2)
        outputs = ops.take(updates, ops.reshape(rows, (-1,)), axis=0)
        outputs = ops.reshape(
            outputs,
            (
                -1,
                num_experts,
                self.num_patches,
                patch_h,
                patch_w,
                self.expert_channels,
            ),
        )
        if self.combine == "concat":
            # (example, patch, ph, pw, expert, channel): experts side by side.
            outputs = ops.transpose(outputs, (0, 2, 3, 4, 1, 5))
        else:
            outputs = ops.sum(outputs, axis=1)
        return self._unpatch(outputs)

    def _unpatch(self, patches):
        grid_h, grid_w = self.grid_shape
        patch_h, patch_w = self.patch_size
        x = ops.reshape(
            patches,
            (-1, grid_h, grid_w, patch_h, patch_w, self.output_channels),
        )
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(
            x, (-1, grid_h * patch_h, grid_w * patch_w, self.output_channels)
        )

    def compute_output_shape(self, inputs_shape):
        if not self.built:
            self.build(inputs_shape)
        self._check_inputs_shape(inputs_shape)
        shape = list(inputs_shape)
        channel_axis = -1 if self.data_format == "channels_last" else 1
        shape[channel_axis] = self.output_channels
        return tuple(shape)

    def compute_output_spec(self, inputs, return_routing=False, training=None):
        outputs = keras.KerasTensor(
            self.compute_output_shape(inputs.shape), self.compute_dtype
        )
        if not return_routing:
            return outputs
        batch = inputs.shape[0]
        selection = (batch, self.num_experts, self.patches_per_expert)
        routing = {
            "indices": keras.KerasTensor(selection, "int32"),
            "gates": keras.KerasTensor(selection, "float32"),
            "routing_values": keras.KerasTensor(
                (batch, self.num_patches, self.num_experts), "float32"
            ),
        }
        return outputs, routing

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "patches_per_expert": self.patches_per_expert,
                "patch_size": self.patch_size,
                "expert_filters": self.expert_filters,
                "expert_kernel_size": self.expert_kernel_size,
                "experts": None
                if self.experts is None
                else [
                    keras.saving.serialize_keras_object(expert)
                    for expert in self.experts
                ],
                "placement": self.placement,
                "gating": self.gating,
                "combine": self.combine,
                "expert_use_bias": self.expert_use_bias,
                "expert_use_pre_activation": self.expert_use_pre_activation,
                "expert_batch_norm_momentum": self.expert_batch_norm_momentum,
                "expert_batch_norm_epsilon": self.expert_batch_norm_epsilon,
                "router_initializer": keras.initializers.serialize(
                    self.router_initializer
                ),
                "expert_kernel_initializer": keras.initializers.serialize(
                    self.expert_kernel_initializer
                ),
                "router_regularizer": keras.regularizers.serialize(
                    self.router_regularizer
                ),
                "expert_kernel_regularizer": keras.regularizers.serialize(
                    self.expert_kernel_regularizer
                ),
                "data_format": self.data_format,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("experts") is not None:
            config["experts"] = [
                keras.saving.deserialize_keras_object(expert)
                for expert in config["experts"]
            ]
        return cls(**config)


def _halo_parts(expert, index):
    """Splits a `"halo"` expert into its position-wise layers and its
    convolution, or raises a `ValueError` saying what is allowed."""
    if isinstance(expert, keras.Sequential):
        layers = list(expert.layers)
    else:
        layers = [expert]
    *pointwise, conv = layers if layers else [None]
    problem = None
    if not isinstance(conv, keras.layers.Conv2D):
        problem = "it does not end in a Conv2D"
    elif tuple(conv.strides) != (1, 1) or conv.padding != "same":
        problem = (
            f"its Conv2D has strides={tuple(conv.strides)} and "
            f"padding={conv.padding!r}, not strides 1 and 'same'"
        )
    elif conv.data_format != "channels_last":
        problem = "its Conv2D is not channels-last"
    else:
        for layer in pointwise:
            if not _is_pointwise(layer):
                problem = (
                    f"{layer.name!r} ({type(layer).__name__}) is not a "
                    "position-wise layer"
                )
                break
    if problem is not None:
        raise ValueError(
            "With placement='halo' every expert must be a Conv2D (strides "
            "1, 'same' padding, channels-last) or a keras.Sequential of "
            "position-wise layers (BatchNormalization, LayerNormalization "
            f"over channels, activations, Dropout) ending in one; expert "
            f"{index} ({expert.name!r}) is not: {problem}. Received: "
            f"experts[{index}]={expert!r}"
        )
    return pointwise, conv


def _is_pointwise(layer):
    if not isinstance(layer, _POINTWISE_LAYERS):
        return False
    if isinstance(layer, keras.layers.BatchNormalization):
        return layer.axis in (-1, 3)
    if isinstance(layer, keras.layers.LayerNormalization):
        axis = layer.axis
        return (list(axis) if isinstance(axis, (list, tuple)) else [axis]) in (
            [-1],
            [3],
        )
    if isinstance(layer, keras.layers.Dropout):
        return layer.noise_shape is None
    return True


def _pair(name, value):
    pair = value
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0
            for v in pair
        )
    ):
        raise ValueError(
            f"`{name}` must be a positive int or a tuple of 2 positive ints. "
            f"Received: {name}={value!r}"
        )
    return tuple(pair)
