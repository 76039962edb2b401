"""Resumable training state, written as one consistent unit (private).

A checkpoint directory holds a manifest, `progress.json`, and the two
files it names: the network's weights (a Keras `.weights.h5` file) and a
NumPy archive of the optimizer's variables (iteration count and learning
rate included) and of the network's random-generator states. The files of
epoch `k` are written under new names first; the manifest, with their
SHA-256 digests, replaces the previous one in a single rename, and only
then are the previous epoch's files removed. Whenever the process stops,
`progress.json` names a complete set of files of one epoch.
"""

import hashlib
import json
import math
import os

import keras
import numpy as np
from keras import ops
from keras import tree

MANIFEST = "progress.json"
FORMAT = 2
_PREFIX = "epoch-"


class CheckpointError(ValueError):
    """A checkpoint directory that training cannot resume from.

    `keras_moe.training.train_two_phase` raises it before it trains when
    the checkpoint in its `checkpoint_dir` is damaged (`progress.json`
    unreadable, truncated or incomplete; a file it names missing,
    truncated or changed since it was written; weights that do not fit
    the network) or was made by a run with another configuration. The
    message names the directory and what is wrong with it. Nothing is
    changed in the directory: delete it to start again, or pass another
    `checkpoint_dir`.

    Args:
        directory: the checkpoint directory.
        reason: what is wrong with it.

    Example:

    ```python
    error = keras_moe.training.CheckpointError("runs/a", "no weights")
    isinstance(error, ValueError)  # True
    ```
    """

    def __init__(self, directory, reason):
        self.directory = directory
        self.reason = reason
        super().__init__(
            f"Cannot resume from checkpoint_dir={directory!r}: {reason}. "
            "Delete this directory to start again, or pass another "
            "`checkpoint_dir`."
        )

    def __reduce__(self):
        return type(self), (self.directory, self.reason)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync_file(path):
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _sync_directory(directory):
    """Makes the renames in `directory` durable (POSIX only)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _state_variables(network):
    """The network's variables that are not weights: the states of its
    random generators (dropout and the like)."""
    weights = {id(w) for w in network.weights}
    return [v for v in network.variables if id(v) not in weights]


def as_json(value, name):
    """`value` as it reads back from JSON; a `ValueError` if it cannot be
    written."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`{name}` must hold JSON values only (str, int, float, bool, "
            f"None, lists and dicts of them). Received: {name}={value!r}"
        ) from error


def _differences(saved, given, prefix=""):
    lines = []
    for key in sorted(set(saved) | set(given), key=str):
        before, now = saved.get(key, "<absent>"), given.get(key, "<absent>")
        if before != now:
            lines.append(f"{prefix}{key} {before!r} (this run: {now!r})")
    return lines


class CheckpointDirectory:
    """Reads, checks and writes the checkpoints of one directory."""

    def __init__(self, directory):
        self.directory = str(directory)

    def _path(self, name):
        return os.path.join(self.directory, name)

    def _error(self, reason):
        return CheckpointError(self.directory, reason)

    def read(self):
        """The manifest, checked; `None` when there is no checkpoint."""
        path = self._path(MANIFEST)
        if not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise self._error(
                f"{MANIFEST} cannot be read ({type(error).__name__}: "
                f"{error}); it is truncated or damaged"
            ) from None
        if not isinstance(manifest, dict):
            raise self._error(f"{MANIFEST} does not hold a JSON object")
        if manifest.get("format") != FORMAT:
            raise self._error(
                f"{MANIFEST} has format {manifest.get('format')!r}, not "
                f"{FORMAT}: it is damaged, or was written by an earlier "
                "version of keras_moe, whose checkpoints hold no optimizer "
                "state"
            )
        fields = {
            "phase": int,
            "epochs_done": int,
            "seed": int,
            "run": dict,
            "config": (dict, type(None)),
            "weights": str,
            "state": str,
            "sha256": dict,
            "history": list,
        }
        for key, kind in fields.items():
            if key not in manifest:
                raise self._error(f"{MANIFEST} has no {key!r} entry")
            if not isinstance(manifest[key], kind) or isinstance(
                manifest[key], bool
            ):
                raise self._error(
                    f"{MANIFEST} has an invalid {key!r} entry: "
                    f"{manifest[key]!r}"
                )
        for key in ("weights", "state"):
            name = manifest[key]
            if os.path.basename(name) != name or not name:
                raise self._error(f"{MANIFEST} names an invalid file {name!r}")
            path = self._path(name)
            if not os.path.isfile(path):
                raise self._error(f"{name}, which {MANIFEST} names, is missing")
            if _sha256(path) != manifest["sha256"].get(name):
                raise self._error(
                    f"{name} is not the file that was saved (its SHA-256 "
                    "digest differs): it is truncated or damaged"
                )
        return manifest

    def check_configuration(self, manifest, run, config, seed):
        """Raises a `CheckpointError` if the checkpoint was made by a run
        with another configuration."""
        lines = _differences(manifest["run"], run)
        lines += _differences(manifest["config"] or {}, config or {})
        if seed is not None and seed != manifest["seed"]:
            lines.append(f"seed {manifest['seed']!r} (this run: {seed!r})")
        if lines:
            raise self._error(
                "it was made by a run with another configuration: "
                + "; ".join(lines)
            )

    def restore_network(self, manifest, network):
        try:
            network.load_weights(self._path(manifest["weights"]))
        except Exception as error:
            raise self._error(
                f"the weights in {manifest['weights']} do not fit network "
                f"{network.name!r} ({type(error).__name__}: {error})"
            ) from None
        self._assign(
            manifest, "network_state", _state_variables(network), "network"
        )

    def restore_optimizer(self, manifest, trainer):
        """Builds the trainer's optimizer and gives it the saved state."""
        optimizer = trainer.optimizer
        if not optimizer.built:
            optimizer.build(trainer.trainable_variables)
        self._assign(manifest, "optimizer", optimizer.variables, "optimizer")

    def _assign(self, manifest, prefix, variables, what):
        try:
            with np.load(self._path(manifest["state"])) as archive:
                values = [
                    archive[key]
                    for key in sorted(archive.files)
                    if key.startswith(prefix + "_")
                ]
        except Exception as error:
            raise self._error(
                f"{manifest['state']} cannot be read ({error})"
            ) from None
        shapes = [tuple(v.shape) for v in variables]
        if [tuple(v.shape) for v in values] != shapes:
            raise self._error(
                f"the {what} state in {manifest['state']} does not fit this "
                f"run's {what} (variables of shapes "
                f"{[tuple(v.shape) for v in values]}, expected {shapes})"
            )
        for variable, value in zip(variables, values):
            variable.assign(value)

    def save(self, trainer, manifest):
        """Writes a checkpoint of the trainer's network and optimizer.

        `manifest` holds everything but the file entries, which this adds.
        """
        os.makedirs(self.directory, exist_ok=True)
        stem = f"{_PREFIX}{manifest['epochs_done']:04d}"
        weights, state = f"{stem}.weights.h5", f"{stem}.state.npz"
        temporary = self._path(f"{stem}.tmp.weights.h5")
        trainer.network.save_weights(temporary)
        _sync_file(temporary)
        os.replace(temporary, self._path(weights))
        arrays = {}
        for prefix, variables in (
            ("optimizer", trainer.optimizer.variables),
            ("network_state", _state_variables(trainer.network)),
        ):
            for i, variable in enumerate(variables):
                arrays[f"{prefix}_{i:05d}"] = ops.convert_to_numpy(variable)
        temporary = self._path(f"{stem}.tmp.npz")
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self._path(state))
        manifest = {
            **manifest,
            "format": FORMAT,
            "weights": weights,
            "state": state,
            "sha256": {
                name: _sha256(self._path(name)) for name in (weights, state)
            },
        }
        temporary = self._path(MANIFEST + ".tmp")
        with open(temporary, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self._path(MANIFEST))
        _sync_directory(self.directory)
        for name in os.listdir(self.directory):
            if name.startswith(_PREFIX) and name not in (weights, state):
                os.remove(self._path(name))


class ShuffledArrays(keras.utils.PyDataset):
    """Arrays in batches, in an order that is a function of the epoch.

    The order of epoch `e` is a permutation drawn from `(seed, e)`, so a
    run resumed at epoch `e` sees the batches an uninterrupted run sees.
    `set_epoch` selects the epoch (`EpochOrder` calls it).
    """

    def __init__(self, arrays, batch_size, seed):
        super().__init__()
        self.arrays = tree.map_structure(np.asarray, tuple(arrays))
        sizes = {len(a) for a in tree.flatten(self.arrays)}
        if len(sizes) != 1:
            raise ValueError(
                "The arrays of `train_data` must have the same number of "
                f"examples. Received arrays of lengths {sorted(sizes)}"
            )
        self.num_examples = sizes.pop()
        self.batch_size = batch_size
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        self.order = rng.permutation(self.num_examples)

    def __len__(self):
        return math.ceil(self.num_examples / self.batch_size)

    def __getitem__(self, index):
        order = self.order
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        return tree.map_structure(lambda a: a[rows], self.arrays)


class EpochOrder(keras.callbacks.Callback):
    """Gives a `ShuffledArrays` the epoch before the epoch's batches."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset.set_epoch(epoch)
