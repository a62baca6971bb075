"""$ mpirun -n 2 python examples/custom_model.py [DATASET_DIR]

Train a model defined here in Python, data-parallel, with the library API:
a Sequential of layers (parameters in one flat buffer), the HDF5 shard
reader, the sampler, and the Trainer that does one Allreduce per step.
Without a dataset directory, the built-in synthetic set is used.
"""
import sys

import mpitrain  # first: it sets the BLAS threads per rank before numpy loads
from mpi4py import MPI

from mpitrain.data.checks import check_dataset
from mpitrain.data.manifest import read_manifest
from mpitrain.data.sampler import Sampler
from mpitrain.data.shards import Shards
from mpitrain.model.layers import Linear, Tanh
from mpitrain.model.losses import SoftmaxCrossEntropy
from mpitrain.model.optim import make_optimizer
from mpitrain.model.sequential import Sequential
from mpitrain.runtime import run_or_abort
from mpitrain.data.builtin import builtin_dataset
from mpitrain.parallel.data_parallel import Trainer


def main() -> None:
    comm = MPI.COMM_WORLD
    root = sys.argv[1] if len(sys.argv) > 1 else builtin_dataset(comm)
    manifest = read_manifest(root)
    check_dataset(manifest, comm)  # collective: every rank raises the same error
    features = manifest.features[0]
    model = Sequential([Linear(features, 64), Tanh(), Linear(64, 64), Tanh(),
                        Linear(64, manifest.classes)], dtype="float32", seed=1)
    train = Shards(manifest, "train")
    optimizer = make_optimizer("adam", model.params, model.grads, lr=1e-3)
    trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, train,
                      Sampler(len(train), batch_size=64, seed=1), comm,
                      val=Shards(manifest, "val"))
    for step in range(100):
        loss, metrics, _ = trainer.step(step)  # metrics: the task's, e.g. {"accuracy": ...}
    val = trainer.evaluate()  # {"loss": ..., "accuracy": ...} over the validation split
    if comm.rank == 0:
        print(f"{mpitrain.__version__}: {comm.size} ranks, {model.size} parameters, "
              f"last loss {loss:.3f}, val_loss {val['loss']:.3f}, val_accuracy {val['accuracy']:.3f}")


if __name__ == "__main__":
    run_or_abort(main)
