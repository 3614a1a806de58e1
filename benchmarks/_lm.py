"""Shared pieces of the LLM-data benchmarks: the stdlib corpus as byte windows, and ByteLM training.

Windows are stored as uint8 ``(N, context + 1)`` per domain (the whole corpus is ~31 MB of
text); training draws global indices from any sampler over the domains concatenated in
``DOMAINS`` order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dataorder.corpus import DOMAINS, byte_windows, load_stdlib_corpus
from dataorder.models import ByteLM

CONTEXT, BATCH, LR = 64, 32, 3e-3
MODEL = dict(dim=64, layers=2, heads=4)


@dataclass
class Corpus:
    train: dict[str, torch.Tensor]  # domain -> (n, CONTEXT + 1) uint8 windows
    validation: dict[str, torch.Tensor]
    fingerprint: str
    text: object = None  # the TextCorpus the windows come from

    @property
    def sizes(self) -> dict[str, int]:
        return {d: len(w) for d, w in self.train.items()}

    def tokens(self) -> torch.Tensor:
        """All training windows, the domains concatenated in ``DOMAINS`` order (global indices)."""
        return torch.cat([self.train[d] for d in DOMAINS])

    def domain_of(self) -> torch.Tensor:
        return torch.cat([torch.full((n,), k) for k, n in enumerate(self.sizes.values())])


def load(validation_per_domain: int = 512, seed: int = 0) -> Corpus:
    corpus = load_stdlib_corpus(validation_fraction=0.1)
    rng = np.random.default_rng(seed)
    train, validation = {}, {}
    for domain in DOMAINS:
        train[domain] = byte_windows(corpus.select(split="train", domain=domain), CONTEXT).tokens.to(torch.uint8)
        held = byte_windows(corpus.select(split="validation", domain=domain), CONTEXT).tokens.to(torch.uint8)
        pick = rng.choice(len(held), size=min(validation_per_domain, len(held)), replace=False)
        validation[domain] = held[np.sort(pick)]
    return Corpus(train, validation, corpus.fingerprint, corpus)


def model(seed: int) -> ByteLM:
    torch.manual_seed(seed)
    return ByteLM(context=CONTEXT, **MODEL)


def window_losses(net: ByteLM, windows: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Mean next-byte loss (nats) of each window."""
    out = []
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            tokens = windows[start:start + batch].long()
            logits = net(tokens[:, :-1])
            out.append(F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1))
    return torch.cat(out)


def evaluate(net: ByteLM, corpus: Corpus) -> dict[str, float]:
    losses = {d: float(window_losses(net, w).mean()) for d, w in corpus.validation.items()}
    losses["mean"] = float(np.mean([losses[d] for d in DOMAINS]))
    return losses


def train(batches: Iterator[list[int]], tokens: torch.Tensor, domain_of: torch.Tensor, steps: int, seed: int,
          observe: Callable[[int, dict[str, float]], object] | None = None) -> ByteLM:
    """``steps`` AdamW steps of a fresh ByteLM (initial weights from ``seed``) on the given index batches."""
    net = model(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01)
    for step in range(steps):
        index = torch.as_tensor(next(batches))
        window = tokens[index].long()
        logits = net(window[:, :-1])
        per = F.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="none").mean(1)
        per.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if observe is not None:
            domains = domain_of[index]
            observe(step, {d: float(per.detach()[domains == k].mean()) for k, d in enumerate(DOMAINS) if (domains == k).any()})
    return net


def batches_of(sampler, size: int = BATCH) -> Iterator[list[int]]:
    iterator = iter(sampler)
    while True:
        batch = [i for _, i in zip(range(size), iterator)]
        if not batch:
            return
        yield batch
