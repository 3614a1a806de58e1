"""CD-GraB on the ghost path: DDP training with `sampler.attach(model)`, on CPU with gloo.

DDP all-reduces the gradient as usual; `sampler.step()` all-gathers each layer's captured
inputs and output gradients (B·(in + out) values per linear layer and rank, never the
B × d per-example gradients) and every rank balances the same global batch, so all ranks
keep the same state and the same next order.

Run:
    torchrun --nproc-per-node 2 examples/ddp_ghost.py --epochs 5
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from dataorder import GraBSampler
from dataorder.data import load_digits_split
from dataorder.models import mlp
from dataorder.training import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--balance", default="mean", choices=["mean", "pair", "recursive"])
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    split = load_digits_split()
    train_set = TensorDataset(split.x_train, split.y_train)
    model = DistributedDataParallel(mlp(64, 10, hidden=(128,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    sampler = GraBSampler(train_set, balance=args.balance, seed=0).attach(model)  # rank, world from the group
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()  # DDP all-reduces the gradient
            sampler.step()                                       # gathers the factors, balances the global batch
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss, accuracy = evaluate(model.module, split.x_train, split.y_train)
        if rank == 0:
            print(f"epoch {epoch}: full-train loss {loss:.4f}, accuracy {accuracy:.3f} ({world} ranks)", flush=True)
    # every rank holds the same balancing state and the same next order: check it cheaply
    sampler.set_epoch(args.epochs)
    order = torch.tensor(sampler.global_order()[:64], dtype=torch.float64)
    orders = [torch.zeros_like(order) for _ in range(world)]
    dist.all_gather(orders, order)
    if rank == 0:
        print("next order identical on all ranks:", all(torch.equal(o, orders[0]) for o in orders))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
