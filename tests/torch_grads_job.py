"""$ mpiexec -n N python tests/torch_grads_job.py ALLREDUCE[,ALLREDUCE...] [staged] [cuda] [bfloat16]

``DistributedOptimizer`` in a loop of one's own (Horovod's pattern), checked
against one process that computes every batch whole: after each of 5 steps
the averaged gradients match the whole batch's (to float32 rounding) and the
branch the model never uses gets zeros; then, with BatchNorm (whose batch
statistics are each rank's own, as in DDP), every rank holds the same
parameters and the same buffers.  Exits 0 or raises.
"""
import sys

import torch
from mpi4py import MPI

import mpitrain.torch as mt
from torch_models import Branchy, arrays


class Net(Branchy):
    """Branchy with BatchNorm: buffers the ranks keep alike (rank 0's)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(32)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def train(make, algorithm: str, staged: bool, compare: bool, device: str = "cpu",
          wire=None) -> None:
    """5 steps of ``make()`` on every rank, and (``compare``) of one whole-batch copy."""
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    torch.manual_seed(0)
    net, whole = make().to(device), make().to(device)
    whole.load_state_dict(net.state_dict())
    if rank:  # other values elsewhere: broadcast_parameters must fix them
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    opt = mt.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                  net, allreduce=algorithm, staged=staged, grad_dtype=wire)

    def close(a, b, atol):  # a 16-bit wire rounds each rank's part: compare the norms
        if wire is None:
            return torch.allclose(a, b, rtol=1e-4, atol=atol)
        return float((a - b).norm() / b.norm().clamp_min(1e-12)) < 2e-2

    mt.broadcast_parameters(net)
    mt.broadcast_optimizer_state(opt.optimizer)
    reference = torch.optim.SGD(whole.parameters(), lr=0.1, momentum=0.9)
    x, y = (torch.from_numpy(a).to(device) for a in arrays(96 * 5))
    batch = 96
    for step in range(5):
        xb, yb = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
        lo, hi = rank * batch // size, (rank + 1) * batch // size
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb[lo:hi]), yb[lo:hi]).backward()
        # each rank's loss is its part's mean: the average over equal parts is the whole's
        opt.step()
        reference.zero_grad()
        torch.nn.functional.cross_entropy(whole(xb), yb).backward()
        reference.step()
        for (name, p), q in zip(net.named_parameters(), whole.parameters()):
            if name.startswith("unused"):
                assert not p.grad.any(), f"{name}: a gradient for a branch never used"
                continue
            # (16-bit: the first step's alone; the rounding then moves the parameters)
            if compare and batch % size == 0 and (wire is None or step == 0):
                assert close(p.grad, q.grad, 1e-6), \
                    f"step {step}: {name} differs from the whole batch's gradient"
    flat = torch.cat([t.reshape(-1).float().cpu() for t in net.state_dict().values()]).numpy()
    every = comm.allgather(flat.tobytes())
    assert len(set(every)) == 1, "the ranks hold different parameters or buffers"
    if compare and batch % size == 0 and wire is None:
        for (name, p), q in zip(net.named_parameters(), whole.parameters()):
            assert close(p, q, 1e-5), f"{name} after 5 steps"
    opt.close()
    opt.remove()


def main() -> None:
    staged = "staged" in sys.argv[2:]
    device = "cuda" if "cuda" in sys.argv[2:] else "cpu"
    wire = "bfloat16" if "bfloat16" in sys.argv[2:] else None
    for algorithm in sys.argv[1].split(","):  # each in turn, in one job
        train(Branchy, algorithm, staged, compare=True, device=device, wire=wire)
        train(Net, algorithm, staged, compare=False, device=device, wire=wire)


if __name__ == "__main__":
    main()
