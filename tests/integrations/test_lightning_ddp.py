"""Lightning DDP (2 gloo processes, as torchrun would start them) with DataOrderCallback: shares, resume."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")
pytest.importorskip("transformers")

from dataorder import RandomReshuffling  # noqa: E402
from dataorder.distributed import run_local_group  # noqa: E402
from tests.integrations.ddp_lightning import fit_rank  # noqa: E402
from tests.integrations.tiny import N  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RandomReshuffling", "GraBSampler"])
def test_ddp_ranks_take_their_shares_and_resume_exactly(name, tmp_path):
    whole = run_local_group(fit_rank, 2, str(tmp_path), name, None, timeout=300)
    (checkpoint,) = tmp_path.glob("*step=3.ckpt")  # written by rank 0; every rank resumes from it
    resumed = run_local_group(fit_rank, 2, str(tmp_path / "again"), name, str(checkpoint), timeout=300)
    for rank, (mine, again) in enumerate(zip(whole, resumed)):
        assert (mine["rank"], mine["world_size"]) == (rank, 2)
        assert again["seen"] == mine["seen"][3:] and again["losses"] == mine["losses"][3:]
    first_epoch = [sum(result["seen"][:4], []) for result in whole]
    assert sorted(first_epoch[0] + first_epoch[1]) == list(range(N))
    if name == "RandomReshuffling":
        for rank, indices in enumerate(first_epoch):
            assert indices == list(RandomReshuffling(N, seed=1, rank=rank, world_size=2))
