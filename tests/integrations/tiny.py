"""A tiny GPT-2 from config and a byte-token dataset whose example ``i`` starts with token ``i``."""

from __future__ import annotations

import torch

N, LENGTH = 16, 16


def gpt2(seed: int = 0, dropout: float = 0.1):
    """The same random weights for a given seed (tied ``wte``/``lm_head``, as GPT-2 ships)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                        bos_token_id=0, eos_token_id=0,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def token_dataset(n: int = N, length: int = LENGTH) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 256, (n, length), generator=generator)
    tokens[:, 0] = torch.arange(n)  # the first token names the example: the order is read off the batches
    return [{"input_ids": row, "labels": row} for row in tokens]


def labels(n: int = N) -> list[int]:
    return [i % 3 for i in range(n)]
