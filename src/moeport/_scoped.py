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


@contextlib.contextmanager
def logger_kept(name: str = ""):
    """The logger ``name`` (the root logger by default) with the level and handlers it had before the block,
    whatever the block changed (e.g. a module whose import calls ``logging.basicConfig``), also on errors."""
    logger = logging.getLogger(name or None)
    level, handlers = logger.level, list(logger.handlers)
    try:
        yield logger
    finally:
        for handler in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(handler)
        logger.setLevel(level)
