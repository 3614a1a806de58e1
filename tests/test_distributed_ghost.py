"""Ghost balancing under DDP (gloo, 2 and 3 processes): equal to materialised CD-GraB on every rank."""

import pytest
import torch
from torch import nn

from dist_harness import run_distributed
from reference_grads import per_example_grads

pytestmark = pytest.mark.distributed

N, LOCAL_BATCH, EPOCHS = 23, 3, 3  # 23 examples: the sharding pads the last global batch


class Tokens(nn.Module):
    """Embedding, LayerNorm and Linear on token sequences: every non-linear factor type."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(9, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)).mean(dim=1))


def _setup(model_name):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if model_name == "conv":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
        x = torch.randn(N, 1, 5, 5, generator=generator)
    elif model_name == "tokens":
        model, x = Tokens(), torch.randint(0, 9, (N, 4), generator=generator)
    else:
        model, x = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(N, 5, generator=generator)
    return model, x, torch.randint(0, 3, (N,), generator=generator)


def _train(rank, world_size, balance, model_name, source):
    from torch.nn.parallel import DistributedDataParallel

    from dataorder.ordering import GraBSampler, sources

    if source == "products":  # the exact path's ghost products, as a model above DENSE_EXACT_MAX gets
        sources.DENSE_EXACT_MAX = -1

    model, x, y = _setup(model_name)
    wrapped = DistributedDataParallel(model)
    ghost = GraBSampler(N, balance=balance, seed=3).attach(wrapped)
    materialised = GraBSampler(N, balance=balance, seed=3)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    for epoch in range(EPOCHS):
        ghost.set_epoch(epoch), materialised.set_epoch(epoch)
        local = list(ghost)
        assert local == list(materialised)
        for start in range(0, len(local), LOCAL_BATCH):
            idx = local[start:start + LOCAL_BATCH]
            materialised.step(per_example_grads(model, x[idx], y[idx]))  # CD-GraB all-gathers the rows
            optimizer.zero_grad()
            nn.functional.cross_entropy(wrapped(x[idx]), y[idx]).backward()  # DDP averages the gradients
            ghost.step()  # all-gathers the layers' factors
            optimizer.step()
    ghost.set_epoch(EPOCHS), materialised.set_epoch(EPOCHS)
    states = [{k: v for k, v in s.state_dict()["tensors"].items()} for s in (ghost, materialised)]
    return ghost.global_order().tolist(), materialised.global_order().tolist(), *states


CASES = [(balance, 2, name, "products") for balance in ("mean", "pair", "recursive")
         for name in ("linear", "conv", "tokens")]
CASES += [("mean", 3, "linear", "products"), ("pair", 3, "tokens", "products")]
# a small model's exact path: dense rows built in the backward, all-gathered as step(grads)'s
CASES += [("mean", 2, "conv", "rows"), ("pair", 2, "tokens", "rows"), ("recursive", 3, "linear", "rows")]


@pytest.mark.parametrize(("balance", "world_size", "model_name", "source"), CASES)
def test_ghost_under_ddp_equals_materialised_cd_grab(balance, world_size, model_name, source, tmp_path):
    results = run_distributed(_train, world_size, tmp_path, balance, model_name, source)
    ghost_order, materialised_order, ghost_state, materialised_state = results[0]
    assert ghost_order == materialised_order
    assert sorted(ghost_order) == list(range(N))
    for name, value in materialised_state.items():
        assert torch.allclose(ghost_state[name].double(), value.double(), rtol=1e-4, atol=1e-5), name
    for other in results[1:]:  # every rank balanced the same global batches: identical state
        assert other[0] == ghost_order
        assert all(torch.equal(other[2][name], value) for name, value in ghost_state.items())
