"""GraB and herding through torchdata's StatefulDataLoader, with and without workers.

A training loop takes ``loader.state_dict()`` after ``sampler.step()`` at every step; each
state (through ``torch.save``/``torch.load(weights_only=True)``) must resume bit for bit:
the same batches, the same model, the same next-epoch orders as the uninterrupted run.
"""

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dataorder.grads import PerExampleGrads
from dataorder.ordering import GraBSampler, HerdingSampler

# every test runs on both sources of the exact path (conftest.exact_source)
pytestmark = pytest.mark.usefixtures("exact_source")

stateful = pytest.importorskip("torchdata.stateful_dataloader")

N, BATCH, EPOCHS = 22, 5, 3  # 5 batches per epoch, the last one short


def _data():
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 3, generator=generator), torch.randint(0, 3, (N,), generator=generator))


def _frozen(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class Run:
    """Model, optimizer, sampler and loader of one run, built the same way every time."""

    def __init__(self, kind, path, workers, world=None):
        torch.manual_seed(1)
        self.data = _data()
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.3)
        world = world or {}
        if kind == "herding":
            self.sampler = HerdingSampler(self.data, seed=2, **world)
        else:
            self.sampler = GraBSampler(self.data, balance=kind, seed=2, **world)
        self.path = path
        if path == "ghost":
            self.sampler.attach(self.model)
        else:
            self.per_example = PerExampleGrads(self.model, nn.functional.cross_entropy)
        options = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
        self.loader = stateful.StatefulDataLoader(self.data, batch_size=BATCH, sampler=self.sampler, **options)

    def train_step(self, x, y):
        self.optimizer.zero_grad()
        if self.path == "ghost":
            nn.functional.cross_entropy(self.model(x), y).backward()
            self.sampler.step()
        else:
            self.sampler.step(self.per_example(x, y).grads)
        self.optimizer.step()

    def state(self, epoch):
        return _frozen({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "loader": self.loader.state_dict(), "epoch": epoch})

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])

    def train(self, first_epoch=0, keep_states=False):
        """Batches seen, a state after every step (if asked), the orders of the epochs after each."""
        seen, states, orders = [], [], []
        for epoch in range(first_epoch, EPOCHS):
            self.sampler.set_epoch(epoch)
            for x, y in self.loader:
                seen.append((epoch, x.sum().item()))
                self.train_step(x, y)
                if keep_states:
                    states.append((len(seen), self.state(epoch)))
            orders.append(self.sampler.global_order().tolist())
        self.sampler.set_epoch(EPOCHS)
        orders.append(self.sampler.global_order().tolist())
        return seen, states, orders


def check_every_resume(kind, path, workers, every=1):
    straight = Run(kind, path, workers)
    seen, states, orders = straight.train(keep_states=True)
    weights = [p.detach().clone() for p in straight.model.parameters()]
    assert len(seen) == EPOCHS * 5
    for count, state in states[::every]:
        resumed = Run(kind, path, workers)
        resumed.load(state)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a completed state resumes without a warning
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            rest, _, rest_orders = resumed.train(first_epoch=state["epoch"])
        assert seen[count:] == rest, f"batches after a resume at step {count}"
        assert rest_orders == orders[-len(rest_orders):], f"orders after a resume at step {count}"
        for mine, theirs in zip(resumed.model.parameters(), weights):
            assert torch.equal(mine, theirs), f"weights after a resume at step {count}"


@pytest.mark.parametrize("kind, path", [("mean", "dense"), ("pair", "dense"), ("recursive", "dense"),
                                        ("mean", "ghost"), ("pair", "ghost"), ("recursive", "ghost"),
                                        ("herding", "dense")])
def test_every_step_boundary_resumes_bit_exact_without_workers(kind, path):
    check_every_resume(kind, path, workers=0)


@pytest.mark.parametrize("kind, path", [("pair", "ghost"), ("mean", "dense")])
def test_step_boundaries_resume_bit_exact_with_prefetching_workers(kind, path):
    check_every_resume(kind, path, workers=2, every=3)  # steps 1, 4 (mid-epoch), 7, 10 (end of epoch 1), 13


@pytest.mark.slow
@pytest.mark.parametrize("kind, path", [("mean", "ghost"), ("recursive", "ghost"), ("pair", "dense"),
                                        ("recursive", "dense"), ("herding", "dense")])
def test_every_step_boundary_resumes_bit_exact_with_prefetching_workers(kind, path):
    check_every_resume(kind, path, workers=2)


def test_a_state_held_while_the_loader_runs_ahead_is_completed_by_the_step_that_reaches_it():
    sampler = GraBSampler(8, seed=0)
    grads = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    iterator = iter(sampler)
    yielded = [next(iterator) for _ in range(6)]  # a loader prefetched batches of 2 ahead of the loop
    sampler.step(grads[yielded[:2]])
    early = sampler.state_dict()  # taken ahead of step(): awaits position 6
    frozen = copy.deepcopy(early)
    sampler.step(grads[yielded[2:4]])
    assert early["visited"] == 2  # a step short of the position it awaits: unchanged
    sampler.step(grads[yielded[4:]])
    assert early["visited"] == 6 and early["position"] == 6  # completed in place
    assert torch.equal(early["tensors"]["sums"], sampler.state_dict()["tensors"]["sums"])
    assert frozen["visited"] == 2  # a copy taken before stays as it was
    resumed = GraBSampler(8, seed=0)
    with pytest.warns(UserWarning, match="4 positions after the last step"):
        resumed.load_state_dict(frozen)
    assert resumed.steps_position == 2  # the uncompleted copy resumes at the stepped position


def test_a_state_after_the_last_step_of_an_epoch_yields_nothing_more_that_epoch():
    sampler = GraBSampler(6, seed=0)
    grads = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    sampler.step(grads[list(sampler)])
    resumed = GraBSampler(6, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(0)
    assert list(resumed) == []
    resumed.set_epoch(1)
    sampler.set_epoch(1)
    assert list(resumed) == list(sampler)


def _cd_grab_through_the_loader(rank, world_size, crash_at):
    """CD-GraB on 2 gloo ranks, each with a StatefulDataLoader with 2 workers; crash and resume at a step."""
    run = Run("pair", "dense", workers=2, world={"rank": rank, "world_size": world_size})
    steps, saved = 0, None
    for epoch in range(EPOCHS):
        run.sampler.set_epoch(epoch)
        for x, y in run.loader:
            run.train_step(x, y)
            steps += 1
            if steps == crash_at:
                saved = run.state(epoch)
                break
        if saved is not None:
            break
    if saved is not None:
        run = Run("pair", "dense", workers=2, world={"rank": rank, "world_size": world_size})
        run.load(saved)
        run.train(first_epoch=saved["epoch"])
    else:
        run.sampler.set_epoch(EPOCHS)
    return run.sampler.global_order().tolist(), [p.detach().clone() for p in run.model.parameters()]


@pytest.mark.distributed
@pytest.mark.slow
def test_cd_grab_through_stateful_loaders_with_workers_resumes_bit_exact(tmp_path):
    from dist_harness import run_distributed

    straight = run_distributed(_cd_grab_through_the_loader, 2, tmp_path / "a", -1, timeout=240)
    resumed = run_distributed(_cd_grab_through_the_loader, 2, tmp_path / "b", 4, timeout=240)
    assert straight[0][0] == straight[1][0] == resumed[0][0] == resumed[1][0]
    for rank in range(2):
        for mine, theirs in zip(resumed[rank][1], straight[rank][1]):
            assert torch.equal(mine, theirs)
