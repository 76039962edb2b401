"""Thin helpers over the backends' own multi-device training engines."""

import re

import keras

from keras_moe.layers import GatedConv2D
from keras_moe.layers import PatchExpertChoiceMoE


def model_parallel_layout_map(
    model, device_mesh, model_axis="model", min_channels=256
):
    """A `keras.distribution.LayoutMap` that shards the wide convolutions.

    Data parallelism replicates every weight on every device. Where the
    widened layers of a mixture of experts are too large for that (the
    615-channel convolutions of the W13-All DeepMoE-VGG16, the doubled
    bottlenecks of a wide DeepMoE-ResNet-50), their kernels can be split
    over the devices of a mesh axis instead. This returns a layout map that
    shards the output channels of every `GatedConv2D` kernel and of every
    expert convolution of a `PatchExpertChoiceMoE` that has at least
    `min_channels` output channels, divisible by the size of `model_axis`;
    every other weight is replicated. Use it with
    `keras.distribution.ModelParallel` (JAX backend): make the map from
    one copy of the model, set the distribution, and build the model again,
    so that its weights are created sharded (see the scaling guide).

    The keys are the weights' paths, so the model made for the map and the
    model trained must name their layers alike (every model of
    `keras_moe.models` names its layers).

    Args:
        model: a built Keras model of the architecture to shard.
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_axis: str, the mesh axis the channels are split over.
        min_channels: int, the output channels from which a convolution is
            sharded.

    Returns:
        A `keras.distribution.LayoutMap`.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"], ["cpu:0"])
    model = keras_moe.models.DeepMoEResNet(20, num_classes=10)
    layout_map = keras_moe.training.model_parallel_layout_map(
        model, mesh, min_channels=64)
    layout_map["block9_conv2/kernel"].axes  # (None, None, None, 'model')
    ```
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            f"`model` must be a built Keras model. Received: model={model!r}"
        )
    if model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"`model_axis` must be an axis of the device mesh "
            f"{list(device_mesh.axis_names)}. Received: "
            f"model_axis={model_axis!r}"
        )
    if (
        isinstance(min_channels, bool)
        or not isinstance(min_channels, int)
        or min_channels < 1
    ):
        raise ValueError(
            "`min_channels` must be a positive integer. "
            f"Received: min_channels={min_channels!r}"
        )
    shards = device_mesh.shape[list(device_mesh.axis_names).index(model_axis)]
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for layer in _wide_convolutions(model):
        filters = layer.kernel.shape[-1]
        if filters >= min_channels and filters % shards == 0:
            # Anchored, so that no other weight's path matches the key.
            key = "^" + re.escape(layer.kernel.path) + "$"
            layout_map[key] = (None, None, None, model_axis)
    return layout_map


def _wide_convolutions(model):
    for layer in model.layers:
        if isinstance(layer, GatedConv2D):
            yield layer
        elif isinstance(layer, PatchExpertChoiceMoE):
            for expert in layer.expert_layers:
                if isinstance(expert, keras.layers.Conv2D):
                    yield expert
        elif isinstance(layer, keras.Model):
            yield from _wide_convolutions(layer)


def torch_data_parallel(model, **kwargs):
    """Makes `fit` and `evaluate` of a model run under PyTorch DDP.

    Keras 3 has no data parallelism of its own on the torch backend; its
    guide wraps the model in `torch.nn.parallel.DistributedDataParallel`
    (DDP) and writes a torch training loop. This wraps the model in DDP so
    that the model's own calls, and so `fit`, `evaluate` and
    `keras_moe.training.train_two_phase`, go through it: DDP averages the
    gradients over the processes during the backward pass, before the
    Keras optimizer applies them, and its constructor copies the weights
    of process 0 to the others. Nothing else changes: the loss,
    `compute_loss`, metrics and callbacks are the model's.

    Start one process per device (for example with `torchrun`), initialise
    the process group (`torch.distributed.init_process_group("nccl")` on
    GPUs, `"gloo"` on CPUs), build and compile the model the same way in
    every process, call this, then train each process on its own shard of
    every global batch. Batch normalization computes its statistics on
    each process's shard, as in any DDP training; the logs of each process
    are those of its shard.

    Args:
        model: a built Keras model (for example a `DeepMoETrainer`).
        **kwargs: arguments of `DistributedDataParallel`.
            `find_unused_parameters` defaults to `True`, because weights
            that get no gradient are common here: frozen gating in the
            second phase of `train_two_phase`, routers under hard pMoE
            gating.

    Returns:
        The `DistributedDataParallel` module, for its `no_sync()` context
        and the like.
    """
    if keras.backend.backend() != "torch":
        raise ValueError(
            "`torch_data_parallel` needs the torch backend. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    import torch.distributed
    from torch.nn.parallel import DistributedDataParallel

    if not torch.distributed.is_initialized():
        raise ValueError(
            "Initialise the process group first, for example with "
            '`torch.distributed.init_process_group("gloo")`.'
        )
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            f"`model` must be a built Keras model. Received: model={model!r}"
        )
    kwargs.setdefault("find_unused_parameters", True)
    ddp = DistributedDataParallel(model, **kwargs)
    call = model.call
    state = {"in_ddp": False}

    def ddp_call(*args, **call_kwargs):
        # DDP runs the module's forward, which is this call again: the
        # second time through, run the model's own call.
        if state["in_ddp"]:
            return call(*args, **call_kwargs)
        state["in_ddp"] = True
        try:
            return ddp(*args, **call_kwargs)
        finally:
            state["in_ddp"] = False

    # An instance attribute: Keras's `__call__` reads `self.call`.
    object.__setattr__(model, "call", ddp_call)
    return ddp
