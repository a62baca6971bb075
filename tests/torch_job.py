"""$ mpiexec -n N python tests/torch_job.py OUT_DIR '{"option": value, ...}'

A PyTorch model (``"model"``: mlp, bn or branchy, from tests/torch_models.py)
trained by ``mpitrain.torch.fit`` with AdamW on arrays (``"optimizer"``: sgd
for SGD with momentum).  Rank 0 of the job's communicator writes
OUT_DIR/state.npz (the model's state_dict, by name) and OUT_DIR/summary.json.
"""
import json
import os
import sys

import numpy as np
import torch

import mpitrain
import mpitrain.torch as mt
from torch_models import arrays, model


def main() -> None:
    out, options = sys.argv[1], json.loads(sys.argv[2])
    net = model(options.pop("model", "mlp"))
    if options.pop("optimizer", "adamw") == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    x, y = arrays()
    data = mpitrain.ArrayDataset(x, y, val_fraction=0.2)
    result = mt.fit(net, opt, torch.nn.functional.cross_entropy, data, **options)
    trained, summary = result
    state = {k: v.numpy() for k, v in trained.state_dict().items()}
    flat = b"".join(state[k].tobytes() for k in sorted(state))
    summary["replicas_equal"] = len(set(result.comm.allgather(flat))) == 1
    if result.comm.rank == 0:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "state.npz"), **state)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
