"""One way to change the user's model for an export, and to change it back: ``Patch`` data and the ``Patcher``.

Everything the exporter sets on objects it does not own (a module's ``dispatch`` or ``forward``, a config's
experts implementation, the expert weights attached as buffers, a modeling module's function) is a
``Patch``: which attribute of which object takes which value. A ``Patcher`` applies patches in order and
records, per attribute, what was there before (a value, a buffer, or nothing on the instance). On exit,
also after an exception or a KeyboardInterrupt, it puts every recorded attribute back, last applied first:
the model is left as it was, with the same instance attributes, buffers and ``forward`` resolution.

If applying a patch fails, the patches applied before it are restored and the original exception
propagates unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["Patch", "Patcher"]


@dataclass(frozen=True, eq=False)
class Patch:
    """While a ``Patcher`` holds it, ``getattr(target, name)`` is ``value``.

    ``buffer``: ``value`` is a tensor registered as a non-persistent buffer of the ``nn.Module`` target
    (torch.export lifts buffers to named initializers), instead of set as a plain attribute.
    """

    target: Any
    name: str
    value: Any
    buffer: bool = False

    def __repr__(self) -> str:
        kind = "buffer" if self.buffer else "attribute"
        return f"Patch({type(self.target).__name__}.{self.name}, {kind})"


@dataclass(frozen=True)
class _Saved:
    """What ``target.name`` was before the first patch of it, and how to put it back."""

    patch: Patch  # the first patch of this attribute (it keeps the target alive)
    restore: Callable[[], None]


def _buffer_state(module: nn.Module, name: str) -> Callable[[], None]:
    """How to put back ``module``'s buffer ``name`` as it is now: the same tensor and persistence, or no buffer."""
    if name in module._buffers:
        tensor, persistent = module._buffers[name], name not in module._non_persistent_buffers_set
        return lambda: module.register_buffer(name, tensor, persistent=persistent)
    return lambda: delattr(module, name)


def _attribute_state(target: Any, name: str) -> Callable[[], None]:
    """How to put back ``target.name`` as it is now.

    Set on the instance (its ``__dict__``, or an ``nn.Module``'s parameters, buffers, submodules), or
    handled by a class-level data descriptor (a property such as a transformers config's
    ``_experts_implementation``): set the current value back. Otherwise it is absent from the instance
    (a class attribute such as ``forward`` shows through): delete what the patch set.
    """
    own: dict = dict(getattr(target, "__dict__", {}))
    if isinstance(target, nn.Module):
        own.update(target._parameters)
        own.update(target._buffers)
        own.update(target._modules)
    if name in own:
        value = own[name]
        return lambda: setattr(target, name, value)
    descriptor = inspect.getattr_static(type(target), name, None)
    if hasattr(type(descriptor), "__set__"):
        value = getattr(target, name)
        return lambda: setattr(target, name, value)
    return lambda: delattr(target, name)


class Patcher:
    """Apply ``patches`` on entry, restore every patched attribute on exit (last applied first).

    ``apply()`` adds patches while the patcher is active (they are restored with the others). An attribute
    patched twice, by one patch after another (layers that share one config object), is restored once,
    to the value it had before the first: the order in which sites touch shared objects does not matter.
    Re-entering an active patcher is an error.
    """

    def __init__(self, patches: Iterable[Patch] = ()):
        self._pending = list(patches)
        self._saved: list[_Saved] = []
        self._keys: set[tuple[int, str]] = set()
        self._active = False

    def __enter__(self) -> "Patcher":
        if self._active:
            raise RuntimeError("this Patcher is already active")
        self._active = True
        self.apply(*self._pending)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.restore(exc)
        return False  # an exception from the block propagates as it was

    def apply(self, *patches: Patch) -> None:
        """Apply ``patches`` in order. If one fails, everything this patcher applied is restored (last first)
        and the exception raised by the failing patch propagates."""
        if not self._active:
            raise RuntimeError("Patcher.apply() needs an active patcher (use it as a context manager)")
        try:
            for patch in patches:
                self._apply_one(patch)
        except BaseException as exc:
            self.restore(exc)
            raise

    def _apply_one(self, patch: Patch) -> None:
        if patch.buffer and not isinstance(patch.value, torch.Tensor):
            raise TypeError(f"{patch!r}: a buffer patch needs a tensor, got {type(patch.value).__name__}")
        key = (id(patch.target), patch.name)
        first = key not in self._keys
        if first:
            restore = (_buffer_state if patch.buffer else _attribute_state)(patch.target, patch.name)
        if patch.buffer:
            patch.target.register_buffer(patch.name, patch.value, persistent=False)
        else:
            setattr(patch.target, patch.name, patch.value)
        # Recorded only once applied: when patch N raises, patches 0..N-1 are what gets restored.
        if first:
            self._keys.add(key)
            self._saved.append(_Saved(patch, restore))

    def restore(self, exc: BaseException | None = None) -> None:
        """Put back every patched attribute, last applied first; the patcher then holds nothing.

        Every attribute is attempted even if one fails or a KeyboardInterrupt arrives. Failures are raised
        (the first, with the others as notes) unless ``exc``, the exception already propagating, is given:
        then they become its notes, so the original error is the one reported. An interrupt met while
        restoring is raised once all is restored, whatever else is propagating.
        """
        failures: list[str] = []
        first: BaseException | None = None
        interrupt: BaseException | None = None
        while self._saved:
            saved = self._saved.pop()
            try:
                saved.restore()
            except Exception as failure:  # keep restoring the others; reported below, never dropped
                failures.append(f"restoring {saved.patch!r} failed: {type(failure).__name__}: {failure}")
                first = first or failure
            except BaseException as stop:  # KeyboardInterrupt, SystemExit: finish restoring, then stop
                interrupt = interrupt or stop
        self._keys.clear()
        self._active = False
        if interrupt is not None:
            for note in failures:
                interrupt.add_note(note)
            raise interrupt
        if first is None:
            return
        if exc is not None:
            for note in failures:
                exc.add_note(note)
            return
        for note in failures[1:]:
            first.add_note(note)
        raise first
