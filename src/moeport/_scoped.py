"""Process-wide settings that a library call changes only for its own duration, restored on exit."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """The logger ``name`` at ``level`` inside the block, at its previous level afterwards (also on errors)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(previous)
