"""$ mpiexec -n N python tests/fit_job.py OUT_DIR '{"fit option": value, ...}'

A model with a registered layer of the tests' own (``fit_layers.Gate``) trained by
``mpitrain.fit`` on arrays; ``"data"`` in the options chooses the data: ``"arrays"``
(every rank, the default), ``"root"`` (rank 0 alone) or a dataset directory.  Rank 0
of the job's communicator writes OUT_DIR/params.npz (the trained parameters, by name),
OUT_DIR/outputs.npy (the trained model's outputs on the first 100 samples) and
OUT_DIR/summary.json.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

import mpitrain
from fit_layers import arrays, model


def main() -> None:
    out, options = sys.argv[1], json.loads(sys.argv[2])
    where = options.pop("data", "arrays")
    dtype = options.pop("model_dtype", "float32")
    mine = MPI.COMM_WORLD.rank == 0
    x, y = arrays()
    if where == "arrays":
        data = mpitrain.ArrayDataset(x, y, val_fraction=0.2)
    elif where == "root":
        data = mpitrain.ArrayDataset(x if mine else None, y if mine else None,
                                     val_fraction=0.2, root=0)
    else:
        data = where
    result = mpitrain.fit(model(dtype=dtype), data, **options)
    trained, summary = result
    # fit returns the same parameters on every rank, whatever the layout
    summary["replicas_equal"] = len(set(result.comm.allgather(trained.params.tobytes()))) == 1
    if result.comm.rank == 0:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "params.npz"), **trained.named_params())
        np.save(os.path.join(out, "outputs.npy"), trained(x[:100].astype(trained.dtype)))
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
