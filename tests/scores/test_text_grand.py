"""GraNd of text documents on the ghost path, against a per-document backward reference."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from dataorder.cli import main
from dataorder.models import ByteLM
from dataorder.scores.text import TextInputError, document_scores, grouped_quadratic, make_windows, tokenize

CONTEXT = 4
# 1 to 5 windows of context 4: a one-token tail, exact multiples, one-window documents
TEXTS = ["ab", "hello world!", "abcdefgh", "abcdefghi", "x = 1\n", "the quick brown fox", "zz z"]


class DropoutLM(nn.Module):
    """A hand-built LM with dropout: scores must come from eval mode."""

    def __init__(self, vocab: int = 256, dim: int = 6) -> None:
        super().__init__()
        self.embed, self.drop, self.head = nn.Embedding(vocab, dim), nn.Dropout(0.5), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.drop(self.embed(tokens))))


def byte_lm() -> nn.Module:
    torch.manual_seed(0)
    return ByteLM(context=CONTEXT, dim=8, layers=1, heads=2)


def reference_grand(model: nn.Module, texts: list[str], mode: str, names: list[str] | None = None) -> np.ndarray:
    """‖∇ mean token loss‖ per document by one backward each, on the unpadded pieces of the document."""
    model.eval()
    params = [p for name, p in model.named_parameters() if names is None or name in names]
    tokens, _ = tokenize(texts)
    out = []
    for ids in tokens:
        ids = torch.tensor(ids.astype(np.int64))
        stop = min(len(ids), CONTEXT + 1) if mode == "truncate" else len(ids)
        total, count = 0.0, 0
        for start in range(0, stop - 1, CONTEXT):
            piece = ids[start:min(start + CONTEXT + 1, stop)]
            logits = model(piece[:-1][None])[0]
            total = total + nn.functional.cross_entropy(logits, piece[1:], reduction="sum")
            count += len(piece) - 1
        grads = torch.autograd.grad(total / count, params)
        out.append(float(torch.sqrt(sum(g.double().square().sum() for g in grads))))
    return np.array(out)


@pytest.mark.parametrize("mode", ["split", "truncate"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])  # long documents in chunks / mixed / one batch
@pytest.mark.parametrize("make", [byte_lm, lambda: (torch.manual_seed(1), DropoutLM())[1]], ids=["bytelm", "hand"])
def test_grand_equals_a_per_document_backward(mode, batch_size, make):
    model = make()
    windows = make_windows(tokenize(TEXTS)[0], CONTEXT, mode)
    got = document_scores(model, windows, batch_size, scores=("grand",))["grand"]
    np.testing.assert_allclose(got, reference_grand(model, TEXTS, mode), rtol=2e-5)


def test_grand_params_select_the_parameters():
    model = byte_lm()
    windows = make_windows(tokenize(TEXTS)[0], CONTEXT)
    got = document_scores(model, windows, 3, scores=("grand",), grand_params="last")["grand"]
    np.testing.assert_allclose(got, reference_grand(model, TEXTS, "split", ["head.weight", "head.bias"]), rtol=2e-5)
    with pytest.raises(TextInputError, match="matches no parameter"):
        document_scores(model, windows, scores=("grand",), grand_params="nope")


def test_padding_contributes_nothing():
    model = byte_lm()
    windows = make_windows(tokenize(TEXTS)[0], CONTEXT)
    padded = windows.tokens.clone()
    targets_mask = torch.cat([torch.ones(len(padded), 1, dtype=torch.bool), windows.mask], 1)
    padded[~targets_mask] = 77  # any other padding token
    assert (padded != windows.tokens).any()
    other = type(windows)(padded, windows.mask, windows.document, windows.documents)
    for batch_size in (1, 64):
        a = document_scores(model, windows, batch_size, scores=("loss", "el2n", "grand"))
        b = document_scores(model, other, batch_size, scores=("loss", "el2n", "grand"))
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)


def test_grad_and_mode_are_untouched():
    model = DropoutLM()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    windows = make_windows(tokenize(TEXTS)[0], CONTEXT)
    first = document_scores(model, windows, 2, scores=("grand", "loss"))
    second = document_scores(model, windows, 2, scores=("grand", "loss"))
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    np.testing.assert_array_equal(first["grand"], second["grand"])  # dropout off: eval mode
    np.testing.assert_allclose(first["grand"], reference_grand(model, TEXTS, "split"), rtol=2e-5)


def test_loss_with_grand_matches_loss_alone():
    model = byte_lm()
    windows = make_windows(tokenize(TEXTS)[0], CONTEXT)
    alone = document_scores(model, windows, 3, scores=("loss", "el2n"))
    both = document_scores(model, windows, 3, scores=("loss", "el2n", "grand"))
    assert list(both) == ["loss", "el2n", "grand"]
    for name in alone:
        np.testing.assert_allclose(both[name], alone[name], rtol=1e-6)


def test_grouped_quadratic_is_the_norm_of_the_weighted_sum():
    torch.manual_seed(0)
    rows = torch.randn(6, 5, dtype=torch.float64)
    weight = torch.rand(6, dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 2, 2, 2])
    want = torch.stack([(weight[group == g, None] * rows[group == g]).sum(0).square().sum() for g in range(3)])
    torch.testing.assert_close(grouped_quadratic(rows @ rows.T, weight, group, 3), want)


# -- the command line ---------------------------------------------------------------------------
FAST = ["--runs", "2", "--score-epoch", "1", "--epochs", "1", "--context", "8", "--batch-size", "16",
        "--score-batch-size", "8", "--no-progress"]


def write_docs(path, n=40):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abc de\n"), size=int(rng.integers(3, 30)))) + "." for _ in range(n)]
    pq.write_table(pa.table({"text": docs}), path)
    return path


def test_cli_scores_grand_for_text_and_resumes(tmp_path, capsys):
    data = write_docs(tmp_path / "docs.parquet")
    out = tmp_path / "out"
    args = ["score", "--data", str(data), *FAST, "--scores", "loss,grand", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "grand" in printed and "run-vs-run Spearman" in printed
    table = pq.read_table(out / "scores.parquet")
    grand = table.column("grand").to_numpy()
    assert grand.shape == (40,) and np.all(np.isfinite(grand)) and np.all(grand > 0)
    assert set(json.loads((out / "consistency.json").read_text())) == {"loss", "grand"}
    before = (out / "scores.parquet").read_bytes()
    assert main(args) == 0  # a finished text run is reused, not recomputed (regression: it was redone)
    assert "0 computed, 2 reused" in capsys.readouterr().out
    assert (out / "scores.parquet").read_bytes() == before


def test_cli_reference_split_runs_are_reused(tmp_path, capsys):
    data = write_docs(tmp_path / "docs.parquet")
    args = ["score", "--data", str(data), *FAST, "--scores", "loss,grand", "--reference-split", "0.25",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0 and main(args) == 0
    assert "0 computed, 2 reused" in capsys.readouterr().out.splitlines()[-3]


def test_cli_bad_grand_params_fail_in_one_line_and_write_nothing(tmp_path, capsys):
    data = write_docs(tmp_path / "docs.parquet")
    out = tmp_path / "out"
    assert main(["score", "--data", str(data), *FAST, "--scores", "grand", "--grand-params", "nope",
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "--grand-params nope" in error and len(error.splitlines()) == 1
    assert not out.exists()
