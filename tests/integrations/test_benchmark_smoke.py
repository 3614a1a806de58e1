"""Smoke run of benchmarks/trainer_overhead.py --quick (slow: spawns Python and trains three times)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.slow
def test_trainer_overhead_quick_prints_every_row():
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=str(BENCHMARKS.parent))
    result = subprocess.run([sys.executable, str(BENCHMARKS / "trainer_overhead.py"), "--quick"], cwd=BENCHMARKS,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    for row in ("Trainer (its RandomSampler)", "DataOrderTrainer + RR", "DataOrderTrainer + GraB (mean)",
                "load state: GraB (mean), n=10,000", "Trainer re-draw of 156 batches"):
        assert row in result.stdout
