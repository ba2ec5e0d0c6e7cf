"""The command line as a user starts it: `python -m cvt` (what `torchrun -m cvt` runs) is the `cvt` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cvt.cli import COMMANDS


@pytest.mark.slow
def test_python_m_cvt_help():
    result = subprocess.run(
        [sys.executable, "-m", "cvt", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cvt ")
    assert all(name in result.stdout for name in COMMANDS)
