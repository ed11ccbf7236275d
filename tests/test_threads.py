"""mlxq sets OpenMP's spin count before torch loads OpenMP, and only then (mlxq._threads)."""

from __future__ import annotations

import os
import subprocess
import sys

from mlxq import _threads

SHOW = "import os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_importing_mlxq_first_sets_a_short_spin():
    assert _run(f"import mlxq, torch; {SHOW}") == f"{_threads.SPIN_COUNT} None"


def test_torch_first_or_a_user_choice_is_left_alone():
    assert _run(f"import torch, mlxq; {SHOW}") == "None None"
    assert _run(f"import mlxq; {SHOW}", GOMP_SPINCOUNT="5") == "5 None"
    assert _run(f"import mlxq; {SHOW}", OMP_WAIT_POLICY="ACTIVE") == "None ACTIVE"


def test_the_command_line_sets_it_before_torch_loads():
    code = (
        "import sys; from mlxq.cli import main; import os, torch; "
        "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert _run(code) == f"True {_threads.SPIN_COUNT}"
