"""CD-GraB data-parallel training without DDP's all-reduce, on CPU with gloo.

Each rank computes per-example gradients of its share of the global batch; one
all-gather gives every rank the whole global batch's gradients. Their mean IS the
data-parallel gradient (what DDP's all-reduce would compute), and the same gathered rows
feed GraB, so all ranks hold the same balancing state and the same next order.

Run:
    torchrun --nproc-per-node 2 examples/ddp_grab.py --epochs 5

Communication per step: each rank sends B·d floats (B local examples, d parameters) and
receives (W-1)·B·d. With --sketch-dim k only the balancing uses a sketch; the optimiser
still needs the full mean gradient, so gathering full rows is the price of skipping the
all-reduce (an all-reduce moves about 2·d floats per rank instead): use this when B is
small relative to the model, or balance on sketches and keep DDP for the gradient.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dataorder import GraBSampler, PerExampleGrads
from dataorder.data import load_digits_split
from dataorder.distributed import gather_global_batch
from dataorder.models import mlp
from dataorder.training import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--balance", default="pair", choices=["mean", "pair", "recursive"])
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    split = load_digits_split()
    train_set = TensorDataset(split.x_train, split.y_train)
    model = mlp(64, 10, hidden=(128,))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    sampler = GraBSampler(train_set, balance=args.balance, seed=0)  # rank and world size from the group
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    per_example = PerExampleGrads(model, nn.functional.cross_entropy)
    params = [p for p in model.parameters() if p.requires_grad]

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            rows = per_example(x, y).grads                   # (B, d), this rank's examples
            gathered = gather_global_batch(rows)             # (W·B, d), in global-batch order, on every rank
            sampler.step(gathered, global_batch=True)        # CD-GraB: the same balancing on every rank
            mean = gathered.mean(0)                          # the data-parallel gradient, no all-reduce
            offset = 0
            for p in params:
                p.grad = mean[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss, accuracy = evaluate(model, split.x_train, split.y_train)
        if rank == 0:
            print(f"epoch {epoch}: full-train loss {loss:.4f}, accuracy {accuracy:.3f} ({world} ranks)", flush=True)
    # every rank holds the same model: check it cheaply
    checksum = torch.tensor([sum(p.double().sum().item() for p in params)])
    gathered_sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered_sums, checksum.double())
    if rank == 0:
        print("models identical on all ranks:", all(torch.equal(s, gathered_sums[0]) for s in gathered_sums))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
