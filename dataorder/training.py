"""One training loop for ``dataorder compare`` and the benchmarks, and its time-to-quality numbers.

:func:`train_run` trains one model with one ordering and records, at every evaluation, the
full-train loss, the epoch position and the training loop's wall-clock time so far (data
loading, forward, backward, balancing, optimizer; evaluation is timed separately and left
out). :func:`summarize` turns runs into the yardstick of every ordering: the time until the
full-train loss first reaches random reshuffling's final full-train loss, as a ratio to
random reshuffling's, next to its two factors, epochs-to-target and cost per epoch.
"""

from __future__ import annotations

import copy
import hashlib
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dataorder._validate import check_choice
from dataorder.data import TensorSplit
from dataorder.errors import DataorderError
from dataorder.models import build_model
from dataorder.orderings import Ordering

__all__ = ["LR_SCHEDULES", "DivergedError", "Reach", "RunResult", "TargetSummary", "Workload", "WORKLOADS", "evaluate",
           "first_reach", "initial_state", "lr_scheduler", "mean_cross_entropy", "state_digest", "summarize", "train_run",
           "warm_up"]

#: Learning-rate schedules of :func:`train_run`: ``constant`` keeps ``lr``; ``cosine`` decays it along a
#: half cosine from ``lr`` to 0 over the run's steps, stepped after every optimizer step.
LR_SCHEDULES = ("constant", "cosine")


def mean_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every prediction: ``(B, C)`` logits with ``(B,)`` targets, or
    ``(B, T, C)`` with ``(B, T)`` for a language model (each example's mean over ``T``, then the batch mean).

    >>> round(float(mean_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))), 6)
    1.386294
    """
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


class DivergedError(DataorderError, FloatingPointError):
    """A run's full-train loss became NaN or infinite: the learning rate is too high.

    ``ordering``, ``seed`` and ``epoch`` (the evaluation's epoch position) say where; the
    run stops there and returns nothing.

    >>> str(DivergedError("rr", 0, 1.0, float("nan")))
    'rr seed 0 diverged (full-train loss nan at epoch 1); lower the learning rate'
    """

    def __init__(self, ordering: str, seed: int, epoch: float, loss: float) -> None:
        self.ordering, self.seed, self.epoch, self.loss = ordering, seed, epoch, loss
        super().__init__(f"{ordering} seed {seed} diverged (full-train loss {loss} at epoch {epoch:g}); "
                         "lower the learning rate")


@dataclass
class RunResult:
    """One training run, evaluated at ``epochs[i]`` (index 0: before training).

    ``train_loss[i]`` is the full-train loss then and ``train_seconds[i]`` the training loop's
    wall-clock seconds until then (evaluation excluded; it took ``eval_seconds`` in all).
    ``test_loss``/``test_accuracy`` are measured on the held-out split after the last epoch
    (validation windows for the language model, where accuracy is next-byte accuracy);
    ``init_digest`` is :func:`state_digest` of the initial weights.
    """

    ordering: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    init_digest: str = ""

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1]

    @property
    def seconds_per_epoch(self) -> float:
        """Training-loop wall-clock seconds per epoch over the whole run."""
        return self.train_seconds[-1] / self.epochs[-1]


@dataclass(frozen=True)
class Reach:
    """The first evaluation at or below a target loss: its epoch position and training seconds."""

    epochs: float
    seconds: float


def first_reach(result: RunResult, target: float) -> Reach | None:
    """The first evaluation of ``result`` whose full-train loss is ``<= target``; ``None`` if none is.

    Evaluations are points: nothing is interpolated between them.

    >>> run = RunResult("rr", 0, train_loss=[2.0, 1.0, 0.5], epochs=[0, 1, 2], train_seconds=[0.0, 3.0, 6.0])
    >>> first_reach(run, 1.0), first_reach(run, 0.4)
    (Reach(epochs=1, seconds=3.0), None)
    """
    for loss, epoch, seconds in zip(result.train_loss, result.epochs, result.train_seconds):
        if loss <= target:
            return Reach(epoch, seconds)
    return None


@dataclass(frozen=True)
class TargetSummary:
    """How one ordering reaches the baseline's final full-train loss, paired with it seed by seed.

    ``time_ratio`` is the median over seeds of (time to target / the baseline's time to its own
    final loss); ``epochs`` and ``baseline_epochs`` the medians of the epochs to target;
    ``cost_ratio`` the median of (seconds per epoch / the baseline's). A seed that never reaches
    the target counts as infinitely late, so a median that lands on one is ``None`` ("not
    reached"); so does a seed whose baseline never reaches its own final loss (a NaN loss, from
    a diverged run), whose ``baseline_epochs`` entry is then infinite. ``reached`` and ``wins``
    count seeds that reached the target, and that did so in less wall-clock time than the
    baseline.
    """

    ordering: str
    seeds: int
    reached: int
    wins: int
    time_ratio: float | None
    epochs: float | None
    baseline_epochs: float
    cost_ratio: float


def _median_or_none(values: Sequence[float]) -> float | None:
    middle = statistics.median(values)
    return None if math.isinf(middle) else middle


def _time_ratio(seconds: float, baseline_seconds: float) -> float:
    if baseline_seconds > 0:
        return seconds / baseline_seconds
    return 1.0 if seconds == 0 else math.inf  # the baseline never got below its initial loss


def summarize(runs: Sequence[RunResult], baseline: Sequence[RunResult]) -> TargetSummary:
    """Time-to-target of ``runs`` against ``baseline`` (the same seeds, e.g. random reshuffling).

    The target of seed ``s`` is the baseline's final full-train loss in seed ``s``.

    >>> def run(name, losses):  # one evaluation per epoch, 2 s per epoch for rr, 3 s otherwise
    ...     cost = 2.0 if name == "rr" else 3.0
    ...     return RunResult(name, 0, losses, list(range(len(losses))), [cost * e for e in range(len(losses))])
    >>> rr, grab = run("rr", [2.0, 1.0, 0.8, 0.6]), run("grab", [2.0, 0.9, 0.6, 0.5])
    >>> s = summarize([grab], [rr])
    >>> s.time_ratio, s.epochs, s.baseline_epochs, s.cost_ratio, s.wins
    (1.0, 2, 3, 1.5, 0)
    """
    by_seed = {r.seed: r for r in baseline}
    missing = sorted({r.seed for r in runs} - set(by_seed))
    if missing:
        raise ValueError(f"baseline has no run for seeds {missing}: run the baseline with the same seeds")
    ratios, epochs, base_epochs, costs, wins = [], [], [], [], 0
    for run in runs:
        base = by_seed[run.seed]
        target = base.final_train_loss
        base_reach, reach = first_reach(base, target), first_reach(run, target)
        base_epochs.append(math.inf if base_reach is None else base_reach.epochs)
        costs.append(run.seconds_per_epoch / base.seconds_per_epoch)
        if reach is None or base_reach is None:  # (no target: a NaN final loss is reached by nothing)
            ratios.append(math.inf)
            epochs.append(math.inf)
            continue
        ratios.append(_time_ratio(reach.seconds, base_reach.seconds))
        epochs.append(reach.epochs)
        wins += reach.seconds < base_reach.seconds
    return TargetSummary(runs[0].ordering, len(runs), sum(not math.isinf(e) for e in epochs), wins,
                         _median_or_none(ratios), _median_or_none(epochs), statistics.median(base_epochs),
                         statistics.median(costs))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode.

    For sequence outputs both are over every predicted position (next-byte loss and accuracy).

    >>> model = nn.Linear(3, 2)
    >>> loss, accuracy = evaluate(model, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    >>> 0.0 <= accuracy <= 1.0
    True
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        logits = logits.reshape(-1, logits.shape[-1])
        target = target.reshape(-1)
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    return total_loss / count, correct / count


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 over a state dict's names and tensor bytes: equal weights, equal digest.

    >>> state_digest(nn.Linear(2, 2).state_dict()) == state_digest(nn.Linear(2, 2).state_dict())
    False
    """
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def initial_state(split: TensorSplit, model_name: str, seed: int) -> dict[str, torch.Tensor]:
    """The initial weights :func:`train_run` gives ``model_name`` for ``seed`` (a fresh copy).

    >>> from dataorder.data import load_digits_split
    >>> split = load_digits_split()
    >>> state_digest(initial_state(split, "logreg", 0)) == state_digest(initial_state(split, "logreg", 0))
    True
    """
    torch.manual_seed(seed)
    model = build_model(model_name, tuple(split.x_train.shape[1:]), split.num_classes)
    return copy.deepcopy(model.state_dict())


def _evaluation_steps(steps: int, per_epoch: int) -> set[int]:
    """The step counts (1..steps) after which an epoch evaluates: ``per_epoch`` evenly spaced, the last one last."""
    return {max(1, round(steps * i / per_epoch)) for i in range(1, per_epoch + 1)}


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str,
                 total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The scheduler of ``schedule`` (one of :data:`LR_SCHEDULES`) over ``total_steps`` optimizer
    steps, or None for ``constant``.

    >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    >>> scheduler = lr_scheduler(optimizer, "cosine", total_steps=4)
    >>> lrs = []
    >>> for _ in range(4):
    ...     lrs.append(round(optimizer.param_groups[0]["lr"], 4)); optimizer.step(); scheduler.step()
    >>> lrs, round(optimizer.param_groups[0]["lr"], 4)
    ([0.4, 0.3414, 0.2, 0.0586], 0.0)
    """
    if check_choice(schedule, "lr_schedule", LR_SCHEDULES) == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def train_run(split: TensorSplit, model_name: str, ordering: Ordering, *, seed: int, epochs: int,
              batch_size: int = 16, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
              lr_schedule: str = "constant",
              device: str = "cpu", augment: str | None = None, evals_per_epoch: int = 1,
              init: Mapping[str, torch.Tensor] | None = None,
              on_epoch: Callable[[], None] | None = None) -> RunResult:
    """Train ``model_name`` on ``split`` with ``ordering`` (SGD with ``lr_schedule``, one of
    :data:`LR_SCHEDULES`), evaluating the full-train loss
    ``evals_per_epoch`` times per epoch (evenly spaced in steps, the last at the epoch's end;
    an evaluation's epoch position is the fraction of the epoch's steps taken).

    The initial weights are ``init`` (a state dict, e.g. :func:`initial_state`), by default
    :func:`initial_state` of ``seed``: every ordering run with the same seed starts from the
    same weights, and its sampler from the same seed. The loss is :func:`mean_cross_entropy`
    (classification, or next-byte prediction for ``lm-tiny``). ``on_epoch`` is called after
    every epoch (a progress bar's hook). CUDA is synchronised before each clock reading. A
    NaN or infinite full-train loss raises :class:`DivergedError` at that evaluation.

    Example::

        >>> from dataorder.data import load_digits_split
        >>> from dataorder.orderings import make_ordering
        >>> result = train_run(load_digits_split(), "logreg", make_ordering("rr"), seed=0, epochs=1,
        ...                    evals_per_epoch=2)
        >>> len(result.train_loss), [round(epoch, 3) for epoch in result.epochs]  # 42 of 85 steps, then 85
        (3, [0, 0.494, 1.0])
    """
    if isinstance(evals_per_epoch, bool) or not isinstance(evals_per_epoch, int) or evals_per_epoch < 1:
        raise ValueError(f"evals_per_epoch must be a positive int, got {evals_per_epoch!r}")
    model = build_model(model_name, tuple(split.x_train.shape[1:]), split.num_classes)
    model.load_state_dict(init if init is not None else initial_state(split, model_name, seed))
    model.to(device)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    dataset = TensorDataset(x_train, y_train)
    if augment is not None:  # "qmc" | "iid": random shifts of square images (dataorder.augment)
        from dataorder.augment import shifted_dataset
        dataset = shifted_dataset(x_train, y_train, augment, seed=seed)
    sampler = ordering.make_sampler(len(dataset), seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = lr_scheduler(optimizer, lr_schedule, total_steps=epochs * len(loader))
    ordering.attach(model, mean_cross_entropy, sampler)
    result = RunResult(ordering=ordering.name, seed=seed, init_digest=state_digest(model.state_dict()))
    clock = _Clock(device)

    def record(epoch: float) -> None:
        clock.pause()
        start = time.perf_counter()
        loss = evaluate(model, x_train, y_train)[0]
        if not math.isfinite(loss):
            raise DivergedError(ordering.name, seed, epoch, loss)
        result.train_loss.append(loss)
        result.eval_seconds += time.perf_counter() - start
        result.epochs.append(epoch)
        result.train_seconds.append(clock.total)

    record(0)
    steps = len(loader)
    evaluate_after = _evaluation_steps(steps, evals_per_epoch) - {steps}
    for epoch in range(epochs):
        clock.resume()
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        model.train()
        for step, (x, y) in enumerate(loader, 1):
            optimizer.zero_grad(set_to_none=True)
            ordering.backward(model, mean_cross_entropy, x, y, sampler)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if step in evaluate_after:
                record(epoch + step / steps)
                clock.resume()
        record(epoch + 1.0)
        if on_epoch is not None:
            on_epoch()
    result.test_loss, result.test_accuracy = evaluate(model, split.x_test.to(device), split.y_test.to(device)) \
        if len(split.x_test) else (float("nan"), float("nan"))
    return result


def warm_up(split: TensorSplit, model_name: str, ordering_name: str, *, batch_size: int, grads: str = "ghost",
            device: str = "cpu") -> None:
    """Run ``ordering_name`` for one short epoch (two batches) so that one-time costs -- numba
    compilation, first-call dispatch -- stay out of the timed runs that follow in this process.

    >>> from dataorder.data import load_digits_split
    >>> warm_up(load_digits_split(), "logreg", "grab", batch_size=16)
    """
    from dataorder.orderings import make_ordering

    size = min(len(split.x_train), 2 * batch_size)
    small = TensorSplit(split.x_train[:size], split.y_train[:size], split.x_test[:0], split.y_test[:0],
                        split.num_classes, split.name)
    train_run(small, model_name, make_ordering(ordering_name, grads=grads), seed=0, epochs=2,
              batch_size=batch_size, device=device)


class _Clock:
    """Accumulates wall-clock seconds between ``resume()`` and ``pause()``."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.total, self._since = 0.0, None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def resume(self) -> None:
        self._since = self._now()

    def pause(self) -> None:
        if self._since is not None:
            self.total += self._now() - self._since
            self._since = None


@dataclass(frozen=True)
class Workload:
    """A benchmark workload: data, model and the SGD settings used for every ordering
    (``lr_schedule``: one of :data:`LR_SCHEDULES`; every built-in workload trains at a constant rate).

    >>> WORKLOADS["digits-logreg"].model, WORKLOADS["digits-logreg"].lr_schedule
    ('logreg', 'constant')
    """

    data: str
    model: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    evals_per_epoch: int = 1
    lr_schedule: str = "constant"
    orders: tuple[str, ...] = ("rr", "so", "flipflop", "grab", "pair", "recursive", "herding", "grab-sketch")

    def load(self) -> TensorSplit:
        """The workload's data split."""
        from dataorder import data

        return LOADERS[self.data](data)


#: data name -> loader of its :class:`TensorSplit` (called with the ``dataorder.data`` module)
LOADERS: dict[str, Callable] = {
    "digits": lambda data: data.load_digits_split(),
    "digits-image": lambda data: data.load_digits_split(image=True),
    "patterns32": lambda data: data.load_patterns32_split(),
    "stdlib-lm": lambda data: data.load_stdlib_lm_split(),
}

_NO_HERDING = ("rr", "so", "flipflop", "grab", "pair", "recursive", "grab-sketch")

#: The time-to-quality workloads (benchmarks/time_to_quality.py; docs/time-to-quality.md).
WORKLOADS: dict[str, Workload] = {
    "digits-logreg": Workload("digits", "logreg", epochs=10, batch_size=16, lr=0.5, weight_decay=1e-3),
    "digits-mlp": Workload("digits", "mlp", epochs=10, batch_size=16, lr=0.1, weight_decay=1e-3),
    "patterns32-lenet": Workload("patterns32", "cnn", epochs=6, batch_size=32, lr=0.02, momentum=0.9,
                                 weight_decay=5e-4, evals_per_epoch=2),
    "patterns32-resnet": Workload("patterns32", "resnet", epochs=6, batch_size=32, lr=0.05, momentum=0.9,
                                  weight_decay=5e-4, evals_per_epoch=2, orders=_NO_HERDING),
    "stdlib-lm": Workload("stdlib-lm", "lm-tiny", epochs=6, batch_size=16, lr=0.3, momentum=0.9,
                          evals_per_epoch=2, orders=_NO_HERDING),
}
