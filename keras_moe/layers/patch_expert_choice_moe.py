import keras
from keras import ops

from keras_moe.layers._validation import check_choice
from keras_moe.layers._validation import check_positive_int
from keras_moe.layers._validation import check_rank
from keras_moe.layers._validation import independent_initializer
from keras_moe.layers._validation import standardize_data_format

GATING_MODES = ("softmax", "hard", "softmax_all")
COMBINE_MODES = ("concat", "sum")


@keras.saving.register_keras_serializable(package="keras_moe")
class PatchExpertChoiceMoE(keras.layers.Layer):
    """Patch-level mixture of experts with expert-choice routing (pMoE).

    The feature map is cut into `n` non-overlapping patches `x^(j)` of size
    `patch_size`. Each of the `num_experts` experts (`k`) has a router
    `w_s` without bias that scores every patch, `r_{s,j} = <w_s, x^(j)>`,
    and picks its top `patches_per_expert` (`l`) patches `J_s(x)`. Only those
    patches are gathered, run through the expert, scaled by their gating
    value `G_{j,s}` and scattered back to their place; every position that
    an expert did not select is zero in that expert's output. The work done
    by the experts is therefore `k * l / n` of running every expert on the
    whole map.

    Gating values:

    - `"softmax"`: softmax over the `l` selected routing values of each
      expert (joint training, pMoE eq. 4). Routers get gradient, except
      with `patches_per_expert=1`, where every gate is identically 1.
    - `"hard"`: `G_{j,s} = 1` (separate training, pMoE eq. 3). Routers get
      no gradient through the layer's output.
    - `"softmax_all"`: softmax over all `n` routing values of each expert,
      then the values of the selected patches; this is what the authors'
      public code does.

    The experts' outputs are combined by `"concat"` (along channels, as in
    the authors' WRN-pMoE, giving `k * expert_channels` channels) or
    `"sum"`. Routing runs in float32, also under mixed precision.

    Each expert is by default a same-padded `Conv2D` with `expert_filters`
    filters and `expert_kernel_size` kernel applied to each selected patch
    on its own (zero padding at the patch border). Any Keras layer or small
    model that maps `(batch, ph, pw, channels)` patches to
    `(batch, ph, pw, expert_channels)` can be given instead through
    `experts`; experts always see channels-last patches.

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
            experts instead of the default convolutions.
        gating: one of `"softmax"`, `"hard"`, `"softmax_all"`.
        combine: `"concat"` or `"sum"`.
        expert_use_bias: bool, whether the default experts have a bias.
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
        inputs: 4D feature map.
        return_routing: bool. When `True`, the call returns
            `(outputs, routing)` where `routing` is the dict returned by
            `route()`.

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
    ```

    Reference:
        M. N. R. Chowdhury et al., "Patch-level Routing in Mixture-of-Experts
        is Provably Sample-efficient for Convolutional Neural Networks",
        ICML 2023, section 3.1, eq. 1, 3 and 4.
    """

    def __init__(
        self,
        num_experts,
        patches_per_expert,
        patch_size,
        expert_filters=None,
        expert_kernel_size=3,
        experts=None,
        gating="softmax",
        combine="concat",
        expert_use_bias=True,
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
        if experts is not None:
            if not isinstance(experts, (list, tuple)) or len(experts) != (
                num_experts
            ):
                raise ValueError(
                    "`experts` must be a list of `num_experts` "
                    f"({num_experts}) layers. Received: experts={experts!r}"
                )
            for expert in experts:
                if not isinstance(expert, keras.layers.Layer):
                    raise ValueError(
                        "Every entry of `experts` must be a Keras layer. "
                        f"Received: experts={experts!r}"
                    )
            experts = list(experts)
        self.experts = experts
        self.gating = check_choice("gating", gating, GATING_MODES)
        self.combine = check_choice("combine", combine, COMBINE_MODES)
        self.expert_use_bias = expert_use_bias
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
                keras.layers.Conv2D(
                    self.expert_filters,
                    self.expert_kernel_size,
                    padding="same",
                    use_bias=self.expert_use_bias,
                    kernel_initializer=independent_initializer(
                        self.expert_kernel_initializer, s
                    ),
                    kernel_regularizer=self.expert_kernel_regularizer,
                    data_format="channels_last",
                    dtype=self.dtype_policy,
                    name=f"expert_{s}",
                )
                for s in range(self.num_experts)
            ]
        else:
            self.expert_layers = self.experts
        patch_shape = (None, patch_h, patch_w, channels)
        expert_channels = set()
        for expert in self.expert_layers:
            if not expert.built:
                expert.build(patch_shape)
            out_shape = tuple(expert.compute_output_shape(patch_shape))
            if len(out_shape) != 4 or out_shape[1:3] != (patch_h, patch_w):
                raise ValueError(
                    "Every expert must map a patch of shape "
                    f"{patch_shape} to a patch of the same height and width. "
                    f"Expert {expert.name!r} gives {out_shape}."
                )
            expert_channels.add(out_shape[-1])
        if len(expert_channels) != 1:
            raise ValueError(
                "All experts must give the same number of output channels. "
                f"Received: {sorted(expert_channels)}"
            )
        self.expert_channels = expert_channels.pop()

    def _spatial_shape(self, shape):
        if self.data_format == "channels_last":
            return shape[1], shape[2], shape[3]
        return shape[2], shape[3], shape[1]

    @property
    def output_channels(self):
        """Channels of the output: `k * expert_channels` or
        `expert_channels`."""
        if self.combine == "concat":
            return self.num_experts * self.expert_channels
        return self.expert_channels

    def _patches(self, inputs):
        """Returns the patches as `(batch, n, ph, pw, channels)`."""
        if self.data_format == "channels_first":
            inputs = ops.transpose(inputs, (0, 2, 3, 1))
        grid_h, grid_w = self.grid_shape
        patch_h, patch_w = self.patch_size
        channels = inputs.shape[-1]
        x = ops.reshape(
            inputs, (-1, grid_h, patch_h, grid_w, patch_w, channels)
        )
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(
            x, (-1, self.num_patches, patch_h, patch_w, channels)
        )

    def _route(self, patches):
        """Routing values, selected patch indices and gating values."""
        flat = ops.reshape(patches, (-1, self.num_patches, self.patch_dim))
        routing_values = ops.einsum(
            "bnd,dk->bnk",
            ops.cast(flat, "float32"),
            ops.cast(self.router, "float32"),
        )
        scores = ops.transpose(routing_values, (0, 2, 1))
        selected, indices = ops.top_k(scores, self.patches_per_expert)
        if self.gating == "hard" or (
            self.gating == "softmax" and self.patches_per_expert == 1
        ):
            # A softmax over a single selected value is identically 1.
            gates = ops.ones_like(selected)
        elif self.gating == "softmax":
            gates = ops.softmax(selected, axis=-1)
        else:
            # The softmax over all n values, at the selected ones: `selected`
            # holds those values already, so no gather is needed (one would
            # fix the batch size when torch exports the layer).
            gates = ops.exp(
                selected - ops.logsumexp(scores, axis=-1, keepdims=True)
            )
        return {
            "indices": indices,
            "gates": gates,
            "routing_values": routing_values,
        }

    def route(self, inputs):
        """Computes the routing decision for `inputs`.

        Args:
            inputs: 4D feature map, as for the call.

        Returns:
            A dict with `"indices"`, int32 `(batch, num_experts,
            patches_per_expert)`: the patches `J_s(x)` each expert selected,
            numbered row-major over the patch grid, highest routing value
            first; `"gates"`, float32 of the same shape: their gating values
            `G_{j,s}`; and `"routing_values"`, float32 `(batch, num_patches,
            num_experts)`: `r_{s,j} = <w_s, x^(j)>` for every patch.
        """
        if not self.built:
            self.build(tuple(inputs.shape))
        return self._route(self._patches(inputs))

    def call(self, inputs, return_routing=False):
        patches = self._patches(inputs)
        routing = self._route(patches)
        indices = routing["indices"]
        gates = ops.cast(routing["gates"], self.compute_dtype)
        batch = ops.shape(patches)[0]
        num_patches = self.num_patches
        num_experts = self.num_experts
        per_expert = self.patches_per_expert
        patch_h, patch_w = self.patch_size
        channels = patches.shape[-1]

        # Gather: each expert's selected patches, (batch, k * l, ph, pw, C),
        # as rows of the (batch * n, patch_dim) patches. (`take_along_axis`
        # broadcasts its indices, which fixes the batch size when torch
        # exports the layer.)
        offsets = ops.arange(batch, dtype="int32")[:, None, None]
        flat_patches = ops.reshape(patches, (-1, self.patch_dim))
        patch_rows = ops.reshape(offsets * num_patches + indices, (-1,))
        selected = ops.take(flat_patches, patch_rows, axis=0)
        selected = ops.reshape(
            selected, (-1, num_experts, per_expert, patch_h, patch_w, channels)
        )

        patch_out = patch_h * patch_w * self.expert_channels
        updates = []
        for s, expert in enumerate(self.expert_layers):
            expert_inputs = ops.reshape(
                selected[:, s], (-1, patch_h, patch_w, channels)
            )
            expert_outputs = ops.cast(expert(expert_inputs), self.compute_dtype)
            expert_gates = ops.reshape(gates[:, s], (-1, 1, 1, 1))
            updates.append(
                ops.reshape(
                    expert_outputs * expert_gates, (-1, per_expert, patch_out)
                )
            )
        # A row of zeros for the patches an expert did not select, then the
        # rows ordered (example, expert, rank) like `indices`.
        updates = ops.reshape(ops.stack(updates, axis=1), (-1, patch_out))
        updates = ops.concatenate(
            [ops.zeros((1, patch_out), dtype=updates.dtype), updates], axis=0
        )

        # Combine with a gather: for every example, expert and patch, the
        # row of that expert's output for the patch, or the zero row. (A
        # scatter-add into the map does the same, but torch exports Keras's
        # segment sum for the traced batch size only.)
        match = ops.equal(
            ops.cast(indices, "int32")[:, :, :, None],
            ops.arange(num_patches, dtype="int32"),
        )
        rank = ops.cast(ops.argmax(ops.cast(match, "int32"), axis=2), "int32")
        expert_ids = ops.arange(num_experts, dtype="int32")[None, :, None]
        rows = (offsets * num_experts + expert_ids) * per_expert + rank + 1
        rows = rows * ops.cast(ops.any(match, axis=2), "int32")
        outputs = ops.take(updates, ops.reshape(rows, (-1,)), axis=0)
        outputs = ops.reshape(
            outputs,
            (
                -1,
                num_experts,
                num_patches,
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
        outputs = self._unpatch(outputs)
        if return_routing:
            return outputs, routing
        return outputs

    def _unpatch(self, patches):
        grid_h, grid_w = self.grid_shape
        patch_h, patch_w = self.patch_size
        x = ops.reshape(
            patches,
            (-1, grid_h, grid_w, patch_h, patch_w, self.output_channels),
        )
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        x = ops.reshape(
            x, (-1, grid_h * patch_h, grid_w * patch_w, self.output_channels)
        )
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 3, 1, 2))
        return x

    def compute_output_shape(self, inputs_shape):
        if not self.built:
            self.build(inputs_shape)
        shape = list(inputs_shape)
        channel_axis = -1 if self.data_format == "channels_last" else 1
        shape[channel_axis] = self.output_channels
        return tuple(shape)

    def compute_output_spec(self, inputs, return_routing=False):
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
                "gating": self.gating,
                "combine": self.combine,
                "expert_use_bias": self.expert_use_bias,
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
