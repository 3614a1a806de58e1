"""Real model zoos on the ghost path, unchanged: HF GPT-2 (tied wte/lm_head, position_ids (1, T), Conv1D)
and an HF BERT encoder (tied decoder, token types), against torch.func per-example gradients."""

import warnings

import pytest
import torch
from torch import nn

from dataorder.ghost import GhostGrads
from dataorder.ordering import GraBSampler
from reference_grads import per_example_grads

transformers = pytest.importorskip("transformers")

POSITIONS = {"gpt2": "transformer.wpe.weight", "bert": "bert.embeddings.position_embeddings.weight"}


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


MODELS = {"gpt2": gpt2, "bert": bert}


def token_loss(logits, tokens):
    """Mean next-token (GPT-2) or same-token (BERT, no masking needed for gradients) cross-entropy."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def setup(name, batch=4, length=12):
    torch.manual_seed(0)
    model = MODELS[name]()
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    return model, tokens


def balanced_reference(model, tokens, name):
    """torch.func per-example gradients without the position table (shared by the batch: left out)."""
    reference = per_example_grads(model, tokens, tokens, token_loss, output=lambda out: out.logits)
    keep, start = [], 0
    for param_name, p in model.named_parameters():
        if param_name != POSITIONS[name]:
            keep.append(reference[:, start:start + p.numel()])
        start += p.numel()
    return torch.cat(keep, dim=1)


def captured(model, tokens, **kwargs):
    ghost = GhostGrads(model, **kwargs)
    with pytest.warns(UserWarning, match="position") as record:  # at the forward (sketch) or collect (exact)
        token_loss(model(tokens).logits, tokens).backward()
        model.zero_grad()
        out = ghost.collect_sketch() if kwargs.get("sketch") else ghost.collect()
    assert len(record) == 1  # the position table only: no torch.func fallback (Conv1D has a rule)
    ghost.remove()
    return ghost, out[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_ghost_equals_torch_func_on_the_balanced_parameters(name):
    model, tokens = setup(name)
    tied = {"gpt2": "transformer.wte.weight", "bert": "bert.embeddings.word_embeddings.weight"}[name]
    ghost, batch = captured(model, tokens)
    assert tied in ghost.tied and POSITIONS[name] not in batch.names
    reference = balanced_reference(model, tokens, name).double()
    scale = reference.abs().max()
    assert torch.allclose(batch.materialize().double(), reference, atol=1e-5 * scale)
    assert torch.allclose(batch.gram().double(), reference @ reference.T, rtol=1e-4, atol=1e-4 * scale ** 2)
    vectors = torch.randn(2, batch.dim, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(batch.dots(vectors).double(), vectors.double() @ reference.T, rtol=1e-4,
                          atol=1e-4 * scale)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sketch_with_k_covering_every_side_equals_torch_func(name):
    model, tokens = setup(name)
    _, rows = captured(model, tokens, sketch=256)
    reference = balanced_reference(model, tokens, name)
    assert torch.allclose(rows, reference, atol=1e-5 * reference.abs().max())


def test_gpt2_sketched_grab_runs_unchanged():
    model, tokens = setup("gpt2", batch=8)
    sampler = GraBSampler(8, seed=0).attach(model, sketch=8)
    sampler.set_epoch(0)
    order = list(sampler)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*position")
        for idx in (order[:4], order[4:]):
            token_loss(model(tokens[idx]).logits, tokens[idx]).backward()
            sampler.step()
    sums = sampler.state_dict()["tensors"]["sums"]
    names = [n for n, _ in model.named_parameters() if n != POSITIONS["gpt2"]]
    assert sums.shape == (1, sum(min(p.numel(), 64) for n, p in model.named_parameters() if n in names))
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(8))


def test_conv1d_rule_equals_torch_func():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 5), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 12, 4))
    x, y = torch.randn(6, 3, 5), torch.randint(0, 4, (6,))
    reference = per_example_grads(model, x, y)
    ghost = GhostGrads(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # registered: no fallback warning
        nn.functional.cross_entropy(model(x), y).backward()
        [batch] = ghost.collect()
    assert torch.allclose(batch.materialize(), reference, atol=1e-6)
    assert torch.allclose(batch.gram(), reference @ reference.T, atol=1e-5)
