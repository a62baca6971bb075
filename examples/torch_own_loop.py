"""$ mpirun -n 2 python examples/torch_own_loop.py [--epochs 3] [--allreduce mpi|ring|shm]

Horovod's pattern on mpitrain, in a PyTorch loop of one's own: the optimizer
wrapped in ``DistributedOptimizer`` (each gradient a view of one flat buffer,
summed over the ranks by MPI as backward makes it final), every rank started
from rank 0's parameters and optimizer state, each rank its own part of each
epoch (torch's ``DistributedSampler``, given the rank and the rank count).
``mpitrain.torch.fit`` does all of this with checkpoints, resume and healing.
"""
import argparse

import mpitrain

mpitrain.init()  # before numpy and torch load: threads per rank; an error on a rank ends the job
import torch
from mpi4py import MPI

import mpitrain.torch as mt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--allreduce", default="mpi", choices=["mpi", "ring", "shm"])
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 32, generator=g)
    y = (x[:, :8].sum(1) > 0).long() + 2 * (x[:, 8:16].sum(1) > 0).long()  # 4 classes
    dataset = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=comm.size,
                                                  rank=comm.rank, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=128 // comm.size,
                                         sampler=sampler)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 4))
    optimizer = mt.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model,
                                        allreduce=args.allreduce)
    mt.broadcast_parameters(model)  # every rank starts from rank 0's values
    mt.broadcast_optimizer_state(optimizer.optimizer)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()  # the buckets are summed over the ranks as backward fills them
            optimizer.step()  # the average over the ranks, applied on every rank
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        if comm.rank == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, accuracy {accuracy:.3f}")
    optimizer.close()


if __name__ == "__main__":
    main()
