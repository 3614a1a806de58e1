"""Each integration example runs to the end on a CPU and checks its own resume."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = {
    "hf_trainer_grab.py": ("transformers", "GraB balances the"),
    "hf_trainer_mixture.py": ("transformers", "resumed from step 5: same examples"),
    "lightning_grab.py": ("lightning", "resumed from step 10: same batches and losses"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script):
    package, expected = EXAMPLES[script]
    pytest.importorskip(package)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
