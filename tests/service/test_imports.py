"""The API process must not import torch or the worker package."""

from __future__ import annotations

import subprocess
import sys


def test_service_api_imports_neither_torch_nor_workers() -> None:
    code = (
        "import sys, service.api, service.cli\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'workers')\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
