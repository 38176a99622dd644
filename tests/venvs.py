"""The Python of a runtime that cannot share the test environment (it replaces or pins what moeport needs).

``venv_python(env, folder, *installs)``: the interpreter named by the environment variable ``env`` when it is
set, else ``folder/bin/python`` of a venv built there on first use by running each ``pip install`` argument
list of ``installs`` in turn (opt-in tests only: they download wheels).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def venv_python(env: str, folder: Path, *installs: list[str]) -> str:
    configured = os.environ.get(env)
    if configured:
        return configured
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        for packages in installs:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return str(python)
