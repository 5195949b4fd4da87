"""docs/api.md runs: every python block, top to bottom, in one fresh interpreter (what a reader would type)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # an in-process federation and a simulation

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_every_example_in_the_api_doc_runs(tmp_path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 7
    script = tmp_path / "api_examples.py"
    script.write_text("\n\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "rounds;" in proc.stdout
