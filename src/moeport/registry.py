"""The one shape every extension point's registry has (families, strategies, tasks, quantization modes and
targets, providers, device targets, model folder layouts, samples): named entries in registration order, a
duplicate name refused at registration (a programming error: ValueError), an unknown name asked for a user error
that lists the choices. What an entry must satisfy beyond its name is checked by the extension point's own
``register_*`` before it calls ``add``."""

from __future__ import annotations

from typing import Generic, TypeVar

from moeport.errors import MoeportError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` (``"model family"``, say) by name. ``reserved``: names no entry may take, offered
    first among the choices (``"auto"`` for strategies, which resolves to a registered one)."""

    def __init__(self, kind: str, reserved: tuple[str, ...] = ()):
        self.kind = kind
        self.reserved = reserved
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries or name in self.reserved:
            raise ValueError(f"{self.kind} {name!r} is already registered" +
                             (" (or reserved)" if name in self.reserved else ""))
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry named ``name``; an unknown name is a user error naming the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise MoeportError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.choices())}") from None

    def copy(self) -> "Registry[T]":
        """A registry with the same entries, which registrations on either do not change in the other (a test that
        registers swaps in a copy)."""
        twin = Registry(self.kind, self.reserved)
        twin._entries = dict(self._entries)
        return twin

    def choices(self) -> list[str]:
        """What a user may name: the reserved names, then the registered ones."""
        return [*self.reserved, *self._entries]

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        """Whether an entry is registered under ``name`` (no ``__iter__``: say ``names()`` or ``values()``)."""
        return name in self._entries
