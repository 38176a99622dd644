"""The versions the suite is verified with: constraints.txt at the repository root (see README, "Test environment").

Tests that enumerate what an installed package provides (the transformers families, the README table) compare
against the locked version: on a newer release they report what it adds instead of failing the default run.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def locked_versions() -> dict[str, str]:
    """``{distribution name (lower case, '-' for '_'): exact version}`` from constraints.txt."""
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (NAME==VERSION)"
            pins[name.strip().lower().replace("_", "-")] = pinned.strip()
    return pins


def is_locked(distribution: str) -> bool:
    """True when the installed ``distribution`` is the version constraints.txt pins (local labels ignored)."""
    return version(distribution).split("+", 1)[0] == locked_versions()[distribution]
