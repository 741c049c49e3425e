"""The README's quickstart runs as written and prints what it says it prints."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_prints_the_documented_accuracy(tmp_path):
    code = python_blocks()[0]
    claimed = float(re.search(r"# prints about: test accuracy ([0-9.]+)", code).group(1))
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy ")
    # the last digit depends on the thread count (float summation order), not on the method
    assert abs(float(last.split()[-1]) - claimed) <= 0.02
