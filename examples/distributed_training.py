"""Train a mixture-of-experts model on one device or several, any backend.

    KERAS_BACKEND=jax python examples/distributed_training.py --devices 1
    KERAS_BACKEND=jax python examples/distributed_training.py --devices 4
    KERAS_BACKEND=jax python examples/distributed_training.py --devices 4 \\
        --model-parallel 2                  # 2-way data x 2-way model
    KERAS_BACKEND=tensorflow python examples/distributed_training.py \\
        --devices 2
    KERAS_BACKEND=torch python examples/distributed_training.py --devices 2

The same script runs everywhere; only the engine that spreads the work
differs, and it is the backend's own:

- jax: `keras.distribution.DataParallel` over `--devices` devices, or
  `keras.distribution.ModelParallel` with the wide convolutions' output
  channels split over `--model-parallel` of them
  (`keras_moe.training.model_parallel_layout_map`);
- tensorflow: `tf.distribute.MirroredStrategy`;
- torch: one process per device, PyTorch DistributedDataParallel
  (`keras_moe.training.torch_data_parallel`), each process training on its
  own part of every global batch; the logs are averaged over processes.

Without accelerators, `--cpu` makes the devices: simulated host devices
for XLA (jax), logical CPU devices (tensorflow), gloo processes (torch).
`--batch-size` is the global batch, split evenly over the devices.

Batch normalization normalises each device's part of the batch with
MirroredStrategy and DDP, and the whole batch under jax's distribution
(one global program). `--accumulate N` trains on one device what N devices
compute in the first case: batches of `batch-size / N`, gradients
accumulated over N of them. The tests use it as the reference.

The models are tiny and the data synthetic (a class is a bright quadrant),
so that a run takes well under a minute on a CPU (most of it compiling);
swap in your model and data. After training,
each model is evaluated on `--test-examples` held-out examples of the same
kind (drawn with another seed). The script prints, for each model, the
devices and engine it ran on, the per-epoch training logs (one column per
epoch) and the held-out test metrics; it writes `results.json` to
`--output-dir`: the backend, the settings and, for each model, the
per-epoch logs, the test metrics, the parameter count, the logits of a
fixed batch and (jax, several devices) how each kernel is sharded.
`--output` writes the per-model part to another file as well. To compare
one device with several, run the script once with `--devices 1` and once
with more, and compare the two results.json files.
"""

import argparse
import json
import os


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=["deepmoe_resnet"],
        choices=MODELS,
        help="one or more models, trained one after the other",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices to train on (torch: processes)",
    )
    parser.add_argument(
        "--model-parallel",
        type=int,
        default=1,
        help="jax: devices each wide convolution is split over",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="simulate --devices devices on the CPU",
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="one device: accumulate gradients over this many parts of "
        "each global batch",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="global batch, split evenly over the devices",
    )
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument(
        "--examples",
        type=int,
        default=64,
        help="synthetic training examples (a multiple of --batch-size)",
    )
    parser.add_argument(
        "--test-examples",
        type=int,
        default=64,
        help="held-out synthetic examples the trained models are evaluated "
        "on (a multiple of --batch-size)",
    )
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="the optimizer (sgd: momentum 0.9)",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=0.05, help="learning rate"
    )
    parser.add_argument(
        "--lambda-gate",
        type=float,
        default=0.5,
        help="DeepMoE: weight of the gate sparsity loss",
    )
    parser.add_argument(
        "--gates-off",
        type=float,
        default=0.0,
        help="DeepMoE: fraction of every gated layer's channels switched "
        "off from the start, so that a short run shows sparse gates",
    )
    parser.add_argument(
        "--dtype-policy",
        default="float32",
        help="float32, mixed_float16 or mixed_bfloat16",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of weights and data"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=29511,
        help="torch: port of the process group's rendezvous",
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/distributed_training",
        help="where results.json is written",
    )
    parser.add_argument(
        "--output",
        help="also write the per-model results to this JSON file "
        "(default: none)%(default).0s",
    )
    args = parser.parse_args(argv)
    if args.batch_size % (args.devices * args.accumulate):
        parser.error("--batch-size must divide over the devices")
    if args.examples % args.batch_size:
        parser.error("--examples must be a multiple of --batch-size")
    if args.test_examples <= 0 or args.test_examples % args.batch_size:
        parser.error(
            "--test-examples must be a positive multiple of --batch-size"
        )
    if args.devices > 1 and args.accumulate > 1:
        parser.error("--accumulate is for one device")
    return args


def configure_devices(args, backend):
    """Device settings that must come before the backend starts."""
    if args.cpu and backend == "jax":
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + flag
        ).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        if args.cpu:
            tf.config.set_visible_devices([], "GPU")
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices
            )


# === Models ===
# Each entry builds a small model under the global dtype policy; a gated
# DeepMoE network (one with GatedConv2D layers) is trained through
# DeepMoETrainer, any other model on the cross entropy.


def deepmoe_resnet():
    from keras_moe.models import DeepMoEResNet

    return DeepMoEResNet(
        8,
        num_classes=4,
        input_shape=(16, 16, 3),
        variant="wide",
        embedding_layers=2,
        embedding_filters=4,
    )


def pmoe_cnn():
    """A conv stem, a pMoE layer (top-2 of 16 patches per expert), a head."""
    import keras

    from keras_moe.layers import PatchExpertChoiceMoE

    images = keras.Input((16, 16, 3), name="images")
    x = keras.layers.Conv2D(
        8, 3, padding="same", activation="relu", name="stem"
    )(images)
    x = PatchExpertChoiceMoE(
        num_experts=4,
        patches_per_expert=2,
        patch_size=4,
        expert_filters=8,
        name="pmoe",
    )(x)
    x = keras.layers.AveragePooling2D(8, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    logits = keras.layers.Dense(4, name="logits")(x)
    return keras.Model(images, logits, name="pmoe_cnn")


MODELS = {"deepmoe_resnet": deepmoe_resnet, "pmoe_cnn": pmoe_cnn}


def quadrant_data(n, seed):
    """Class c has a bright square in quadrant c."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 4)
    x = rng.normal(0.0, 1.0, size=(n, 16, 16, 3)).astype("float32")
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 8 * r : 8 * r + 8, 8 * col : 8 * col + 8] += 0.5
    return x, y.astype("int32")


def build_and_compile(args, name):
    import keras

    from keras_moe.layers import GatedConv2D
    from keras_moe.training import DeepMoETrainer

    keras.utils.set_random_seed(args.seed)
    network = MODELS[name]()
    accumulation = args.accumulate if args.accumulate > 1 else None
    if args.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            args.learning_rate,
            momentum=0.9,
            gradient_accumulation_steps=accumulation,
        )
    else:
        optimizer = keras.optimizers.Adam(
            args.learning_rate, gradient_accumulation_steps=accumulation
        )
    gated = any(isinstance(layer, GatedConv2D) for layer in network.layers)
    if args.gates_off > 0 and gated:
        _switch_off_gates(network, args.gates_off)
    if gated:
        model = DeepMoETrainer(network, lambda_gate=args.lambda_gate)
        model.compile(optimizer=optimizer, metrics=["accuracy"])
    else:
        model = network
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    return network, model


def _switch_off_gates(network, fraction):
    """Makes the first channels' gates `ReLU(W e)` zero for every `e`."""
    import numpy as np
    from keras import ops

    for head in network.get_layer("gating_heads").heads:
        kernel = ops.convert_to_numpy(head.kernel)
        off = int(fraction * kernel.shape[-1])
        # The embedding `e` is a softmax, so non-positive columns of `W`
        # give gates of exactly zero, which stay so: ReLU passes no gradient.
        kernel[:, :off] = -np.abs(kernel[:, :off])
        head.kernel.assign(kernel)


def engine(args, backend):
    """What spreads the work, in words."""
    if args.devices == 1:
        if args.accumulate > 1:
            return (
                f"one device, gradients accumulated over {args.accumulate} "
                "parts of each batch"
            )
        return "one device"
    if backend == "jax":
        if args.model_parallel > 1:
            return (
                f"{args.devices} devices, keras.distribution.ModelParallel "
                f"({args.devices // args.model_parallel}-way data x "
                f"{args.model_parallel}-way model)"
            )
        return f"{args.devices} devices, keras.distribution.DataParallel"
    if backend == "tensorflow":
        return f"{args.devices} devices, tf.distribute.MirroredStrategy"
    return f"{args.devices} processes, PyTorch DistributedDataParallel"


def train(args, rank=0):
    """Trains every model of `--model`; `rank` is the torch process."""
    import keras

    backend = keras.backend.backend()
    results = {}
    for name in args.model:
        if rank == 0:
            print(
                f"{name} on {engine(args, backend)} ({backend}"
                f"{', simulated on the CPU' if args.cpu else ''})"
            )
        results[name] = train_model(args, name, rank)
    if rank == 0:
        if args.output:
            with open(args.output, "w") as f:
                json.dump(results, f)
        # Made when the results are there: a failed run leaves no folder.
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "results.json")
        settings = {
            k: v for k, v in sorted(vars(args).items()) if k != "output"
        }
        with open(path, "w") as f:
            json.dump(
                {
                    "backend": backend,
                    "engine": engine(args, backend),
                    "settings": settings,
                    "models": results,
                },
                f,
                indent=2,
            )
        print(f"wrote {path}")
    return results


def train_model(args, name, rank):
    """Builds, trains and reports one model."""
    import keras
    from keras import ops

    backend = keras.backend.backend()
    keras.config.set_dtype_policy(args.dtype_policy)
    world = args.devices if backend == "torch" else 1
    x, y = quadrant_data(args.examples, args.seed)
    # Held out: drawn with another seed, never trained on.
    x_test, y_test = quadrant_data(args.test_examples, args.seed + 1)
    probe = x[:8]
    scope = None
    if backend == "jax" and args.devices > 1:
        devices = keras.distribution.list_devices()[: args.devices]
        if args.model_parallel > 1:
            from keras_moe.training import model_parallel_layout_map

            mesh = keras.distribution.DeviceMesh(
                (args.devices // args.model_parallel, args.model_parallel),
                ["batch", "model"],
                devices,
            )
            # Built once to read the weights' paths, then again sharded.
            layout_map = model_parallel_layout_map(
                MODELS[name](), mesh, min_channels=8
            )
            keras.utils.clear_session()
            distribution = keras.distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name="batch"
            )
        else:
            distribution = keras.distribution.DataParallel(devices=devices)
        keras.distribution.set_distribution(distribution)
    elif backend == "tensorflow" and args.devices > 1:
        import tensorflow as tf

        kind = "CPU" if args.cpu else "GPU"
        names = [d.name for d in tf.config.list_logical_devices(kind)]
        scope = _mirrored_strategy(tuple(names[: args.devices])).scope()
    if scope is not None:
        with scope:
            network, model = build_and_compile(args, name)
    else:
        network, model = build_and_compile(args, name)
    batch_size = args.batch_size // args.accumulate
    if world > 1:
        from keras_moe.training import torch_data_parallel

        model(x[:1])
        torch_data_parallel(model)
        # This process's part of every global batch.
        per_device = args.batch_size // world
        x = x.reshape((-1, world, per_device) + x.shape[1:])[:, rank]
        y = y.reshape((-1, world, per_device))[:, rank]
        x, y = x.reshape((-1,) + x.shape[2:]), y.reshape(-1)
        batch_size = per_device
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=args.epochs,
        shuffle=False,
        verbose=0,
    ).history
    logs = {k: [float(v) for v in values] for k, values in history.items()}
    if world > 1:
        logs = _mean_over_processes(logs, world)
    # Every process evaluates the whole held-out set (the weights are the
    # same on all of them), in as many steps.
    test = model.evaluate(
        x_test,
        y_test,
        batch_size=batch_size,
        return_dict=True,
        verbose=0,
    )
    test = {k: float(v) for k, v in test.items()}
    # In training mode, so that batch normalization uses the probe's own
    # statistics: the moving averages are updated from each device's part
    # of the batch, a known difference of data parallel training.
    outputs = network(probe, training=True)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    result = {
        "backend": backend,
        "devices": args.devices,
        "model": name,
        "dtype_policy": args.dtype_policy,
        "parameters": int(network.count_params()),
        "history": logs,
        "test": test,
        "test_examples": args.test_examples,
        "probe_logits": ops.convert_to_numpy(
            ops.cast(logits, "float32")
        ).tolist(),
    }
    if backend == "jax" and args.devices > 1:
        result["kernel_shardings"] = _kernel_shardings(network)
        keras.distribution.set_distribution(None)
    if rank == 0:
        epochs = len(next(iter(logs.values()), []))
        print("  training logs, one column per epoch:")
        print(
            f"  {'epoch':>16}  "
            + " ".join(f"{e + 1:>6}" for e in range(epochs))
        )
        for key in sorted(logs):
            values = " ".join(f"{v:6.4f}" for v in logs[key])
            print(f"  {key:>16}: {values}")
        print(
            f"  held-out test ({args.test_examples} examples): "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(test.items()))
        )
    return result


_STRATEGIES = {}


def _mirrored_strategy(devices):
    """One strategy per set of devices: two strategies in one process
    would use the same keys for their collective operations."""
    import tensorflow as tf

    if devices not in _STRATEGIES:
        _STRATEGIES[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _STRATEGIES[devices]


def _mean_over_processes(logs, world):
    import torch
    import torch.distributed as dist

    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    values = (values / world).tolist()
    return dict(zip(keys, values))


def _kernel_shardings(network):
    """Devices each kernel's data is spread over (1: replicated)."""
    shardings = {}
    for weight in network.weights:
        if weight.path.endswith("kernel"):
            sharding = weight.value.sharding
            shape = sharding.shard_shape(weight.value.shape)
            shardings[weight.path] = weight.value.shape[-1] // shape[-1]
    return shardings


def _torch_worker(rank, args):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    backend = "gloo" if args.cpu else "nccl"
    dist.init_process_group(backend, rank=rank, world_size=args.devices)
    try:
        if not args.cpu:
            import torch

            torch.cuda.set_device(rank)
        train(args, rank)
    finally:
        dist.destroy_process_group()


def main(argv=None, configure=True):
    """Runs the script; returns process 0's results, by model."""
    args = parse_args(argv)
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if configure:
        configure_devices(args, backend)
    if backend == "torch" and args.devices > 1:
        import tempfile

        import torch.multiprocessing

        with tempfile.TemporaryDirectory() as tmp:
            output = args.output or os.path.join(tmp, "results.json")
            args.output = output
            torch.multiprocessing.spawn(
                _torch_worker, args=(args,), nprocs=args.devices
            )
            with open(output) as f:
                return json.load(f)
    return train(args)


if __name__ == "__main__":
    main()
