"""Using a trained checkpoint: ``load_model``, and the ``predict`` and ``evaluate`` commands.

``load_model(CKPT)`` rebuilds the network from the checkpoint's configuration
and parameters (checksums verified) and returns a ``Model``: ``model(x)``
gives the task's predictions for inputs x (n, *features): class
probabilities (classification), values in the targets' own units
(regression: the standardisation undone), label probabilities (multilabel);
``model.predict(x)`` gives everything a prediction holds, by name.

``predict`` runs on every rank: each predicts its contiguous slice of the
rows, sends it to rank 0, which writes ``PRED.h5`` in input order (one row
per input row) under a temporary name, renamed when complete; an existing
file is never overwritten.  ``evaluate`` computes the task's metrics over a
split, exactly (float64 sums over the ranks).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence

import numpy as np
from mpi4py import MPI

from ..balance import rank_slice
from ..data.hdf5 import dataset, open_h5
from ..data.manifest import read_manifest
from ..data.shards import Shards
from ..fault.checkpoint import State, load
from ..model.layers import mlp
from ..model.registry import BUILTIN, registered
from ..model.spec import SpecError, build as build_layers, names_in
from ..model.losses import make_loss
from ..model.sequential import Sequential
from ..model.tasks import Classification, Task, make_task
from ..parallel.evaluation import evaluate_split
from ..paths import output_file
from ..runtime import MpitrainError, agreed, on_root

__all__ = ["Model", "load_model", "predict", "evaluate"]

TAG_ROWS = 32000  # point-to-point tag of the predictions sent to rank 0


class Model:
    """A trained network and its task: ``model(x)`` predicts (see the module)."""

    def __init__(self, network: Sequential, task: Task, state: State,
                 input_shape: Sequence[int]):
        self.network, self.task, self.state = network, task, state
        self.input_shape = tuple(int(s) for s in input_shape)  # one sample's

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The network's raw outputs (n, outputs) for inputs ``x`` (n, *input_shape), or
        flattened samples (n, prod(input_shape))."""
        x = np.asarray(x)
        want = math.prod(self.input_shape)
        if x.ndim < 1 or math.prod(x.shape[1:]) != want:
            raise MpitrainError(f"expected samples of shape {self.input_shape} ({want} values "
                                f"each), got inputs of shape {x.shape}")
        # Samples in their shape, or flattened: the model sees them in their shape.
        x = x.reshape(len(x), *self.input_shape).astype(self.network.dtype, copy=False)
        return self.network(x)

    def takes(self, shape: Sequence[int], what: str, path: str) -> None:
        """Refuse samples of ``shape`` (from ``what``) that this model cannot take."""
        if math.prod(shape) != math.prod(self.input_shape):
            raise MpitrainError(f"{what}: samples of shape {tuple(shape)}, and the model of "
                                f"{path} takes {self.input_shape} "
                                f"({math.prod(self.input_shape)} values each)")

    def predict(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        """Everything a prediction holds for inputs ``x`` (n, *features), by name."""
        return self.task.predict(self.outputs(x))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The task's prediction: probabilities, or values in the targets' units."""
        got = self.predict(x)
        return got["probabilities"] if "probabilities" in got else got["value"]


def _layers_of(path: str, state: State):
    """(layers, input shape) of a checkpoint: from its model record, or (before version
    3) the MLP of its configuration."""
    cfg = state.config
    shapes = {n: a.shape for n, a in state.params.items()}
    if "spec" in state.model and not state.model["spec"]:
        raise MpitrainError(f"{path}: its model has a layer that cannot be written as text "
                            "(a Layer class that is not registered): it cannot be rebuilt; "
                            "register the class with @mpitrain.register_layer(NAME)")
    if state.model.get("spec"):
        shape = tuple(state.model["input_shape"])
        last = max(int(n.split(".")[0]) for n in shapes)
        outputs = make_task(state.task).outputs if state.task else shapes[f"{last}.bias"][0]
        _refuse_unregistered(path, state)
        try:
            return build_layers(state.model["spec"], shape, outputs), shape
        except SpecError as exc:
            raise MpitrainError(f"{path}: its model {state.model['spec']!r} cannot be built: "
                                f"{exc}") from None
    features = shapes["0.weight"][1]
    last = max(int(n.split(".")[0]) for n in shapes)
    outputs = shapes[f"{last}.weight"][0]
    layers = mlp(features, list(cfg.get("hidden", [])), outputs, cfg.get("activation", "relu"))
    return layers, (features,)


def _refuse_unregistered(path: str, state: State) -> None:
    """Name the first layer of the checkpoint's model that this process does not know."""
    for name in names_in(state.model["spec"]):
        if name not in BUILTIN and registered(name) is None:
            where = (state.model.get("registered") or {}).get(name)
            hint = (f"import {where.rsplit('.', 1)[0]} (which registers {where})" if where
                    else f"import the module that registers it with "
                         f"@mpitrain.register_layer({name!r})")
            raise MpitrainError(f"{path}: its model needs layer {name!r}, which is not "
                                f"registered in this process: {hint}")


def load_model(path: str) -> Model:
    """The model of checkpoint ``path``, ready for ``model(x)`` (no MPI needed)."""
    state = load(path)
    if state.model and state.model.get("torch"):
        raise MpitrainError(f"{path}: a checkpoint of the PyTorch model "
                            f"{state.model['torch']}: load it into that model with "
                            "model.load_state_dict(mpitrain.torch.load_state(path))")
    layers, shape = _layers_of(path, state)
    network = Sequential(layers, dtype=next(iter(state.params.values())).dtype.name)
    mine = network.named_params()
    if set(mine) != set(state.params) or any(mine[n].shape != state.params[n].shape
                                              for n in mine):
        what = state.model.get("spec") or f"hidden {state.config.get('hidden')}"
        raise MpitrainError(f"{path}: its parameters do not fit the model it describes "
                            f"({what})")
    for name, view in mine.items():
        view[...] = state.params[name]
    task = make_task(state.task) if state.task else Classification(network.layers[-1]
                                                                   .out_features)
    return Model(network, task, state, shape)


def _rows_of(data: str, x_key: Optional[str], split: Optional[str]):
    """(read(lo, hi) -> x rows, row count, what they are) of a dataset split or a file."""
    if os.path.isdir(data):
        m = read_manifest(data)
        split = split or ("val" if m.rows("val") else "train")
        shards = Shards(m, split)
        return (lambda lo, hi: shards.read_range(lo, hi)[0]), len(shards), \
            f"{data} ({split} split)", shards.close, m.features
    if not os.path.isfile(data):
        raise MpitrainError(f"{data}: no such dataset directory or HDF5 file")
    try:
        f = open_h5(data)
    except OSError as exc:
        raise MpitrainError(f"{data}: not a readable HDF5 file: {str(exc).splitlines()[0]}") \
            from None
    ds = dataset(f, x_key or "x", data, "dataset (--x)")
    if ds.ndim < 1 or ds.dtype.kind not in "fiu":
        problem = (f"{data}: dataset {ds.name!r} should hold numbers (samples, ...), got "
                   f"{ds.dtype} {ds.shape}")
        f.close()
        raise MpitrainError(problem)
    return (lambda lo, hi: ds[lo:hi]), int(ds.shape[0]), f"{data}:{ds.name}", f.close, \
        tuple(ds.shape[1:])


def _predicted(model: "Model", read, lo: int, hi: int, what: str, block: int) -> list:
    """The predictions of rows [lo, hi), block by block; a row that is not finite is
    refused with its number (its prediction would be NaN)."""
    parts = []
    for a in range(lo, hi, block):
        x = read(a, min(hi, a + block))
        if x.dtype.kind == "f":
            ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not ok.all():
                raise MpitrainError(f"{what}: row {a + int(np.argmin(ok))} holds NaN or inf: "
                                    "its prediction would be NaN (nothing was written)")
        parts.append(model.predict(x))
    return parts


def predict(checkpoint: str, data: str, out: str, comm: MPI.Comm, *,
            x_key: Optional[str] = None, split: Optional[str] = None,
            block: int = 4096, overwrite: bool = False) -> Dict[str, object]:
    """Predict every row of ``data`` (a dataset directory's split, or an HDF5 file's
    ``x_key`` dataset) with ``checkpoint`` into ``out`` (collective; ``overwrite``: an
    existing ``out`` may be replaced); return a summary."""
    import h5py

    def check_out() -> None:
        if os.path.isfile(out) and not overwrite:
            raise MpitrainError(f"{out}: already exists; choose another --out, or --overwrite "
                                "(nothing was written)")
        output_file(out, "predictions", overwrite=overwrite)

    on_root(comm, check_out)
    model = agreed(comm, lambda: load_model(checkpoint))
    read, n, what, close, shape = agreed(comm, lambda: _rows_of(data, x_key, split))
    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = rank_slice(n, rank, size)
    try:
        agreed(comm, lambda: model.takes(shape, what, checkpoint))
        parts = agreed(comm, lambda: _predicted(model, read, lo, hi, what, block))
        mine = agreed(comm, lambda: {k: np.concatenate([p[k] for p in parts])
                                     if parts else None for k in _keys(model, parts)})
    finally:
        close()
    names = sorted(mine)
    spec = comm.bcast({k: (mine[k].dtype.str, mine[k].shape[1:]) for k in names}
                      if rank == 0 and parts else None, root=0)
    if rank != 0:
        for k in names:
            comm.Send(np.ascontiguousarray(mine[k]), dest=0, tag=TAG_ROWS)
        return comm.bcast(None, root=0)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w", locking=False) as f:
            sets = {k: f.create_dataset(k, (n, *spec[k][1]), dtype=np.dtype(spec[k][0]))
                    for k in names} if spec else {}
            for r in range(size):
                a, b = rank_slice(n, r, size)
                for k in names:
                    if r == 0:
                        got = mine[k]
                    else:
                        got = np.empty((b - a, *spec[k][1]), np.dtype(spec[k][0]))
                        comm.Recv(got, source=r, tag=TAG_ROWS)
                    if b > a:
                        sets[k][a:b] = got
            f.attrs["checkpoint"] = os.path.abspath(checkpoint)
            f.attrs["data"] = what
            f.attrs["task"] = model.task.name
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    summary = {"rows": n, "datasets": names, "out": out, "data": what}
    return comm.bcast(summary, root=0)


def _keys(model: Model, parts) -> list:
    """The names a prediction of ``model`` holds (from a part, or from one sample's worth)."""
    if parts:
        return sorted(parts[0])
    return sorted(model.task.predict(np.zeros((0, model.task.outputs),
                                              model.network.dtype)))


def evaluate(checkpoint: str, data: str, comm: MPI.Comm, split: str = "val",
             block: int = 4096) -> Dict[str, object]:
    """The task's metrics (and the loss) of ``checkpoint`` on ``split`` of the dataset
    directory ``data``, summed exactly over the ranks (collective)."""
    model = agreed(comm, lambda: load_model(checkpoint))
    m = agreed(comm, lambda: read_manifest(data))
    if not m.rows(split):
        raise MpitrainError(f"{m.path}: no {split!r} split to evaluate (splits: "
                            f"{', '.join(m.splits)})", everywhere=True)
    if m.task != model.state.task and model.state.task:
        raise MpitrainError(f"{checkpoint}: written for the task {model.state.task}, "
                            f"{m.path} holds {m.task}", everywhere=True)
    cfg_loss = model.state.config.get("loss", "auto")
    loss = make_loss(model.task.losses[0] if cfg_loss in ("auto", None) else cfg_loss)
    shards = Shards(m, split, model.network.dtype)
    try:
        metrics = evaluate_split(model.outputs, loss, model.task, shards, comm, block)
    finally:
        shards.close()
    return {"split": split, "samples": m.rows(split), **metrics}
