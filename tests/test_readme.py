"""The README's Python code blocks run as written, in order, as one script."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

CHECKS = """
assert codes.shape == (10, 8, 2) and new.shape == (1, 16, 1, 28, 28) and means.shape == (16, 1, 28, 28)
assert set(new.unique().tolist()) <= {0.0, 1.0}
loaded = pyrovae.load("runs/readme")
assert loaded.config == run.config and not loaded.training
print("README OK")
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.mnist
def test_the_readme_python_blocks_run_as_written(tmp_path, mnist_root):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks) + CHECKS)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYROVAE_DATA": str(mnist_root)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "README OK" in result.stdout
    assert (tmp_path / "runs" / "readme" / "checkpoint.pt").is_file()
