"""Record and Frozen: what @dataclass(slots=True) gives a class, without making one at import.

`vhdblkctl info` is mostly start-up, and making a dataclass (generated
methods compiled with exec) costs more than the command's own work. A
subclass lists its fields in __slots__ and writes its __init__ with _init;
equality, repr and (for Frozen) hash and read-only fields follow the fields
in order, as a dataclass's do.
"""

from __future__ import annotations

from typing import TypeVar

_F = TypeVar("_F", bound="Frozen")


class Record:
    """Equality and repr over the fields in __slots__; unhashable, as a mutable dataclass."""

    __slots__: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value, so unhashable

    def _init(self, **values: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"


class Frozen(Record):
    """A Record whose fields are not assigned after __init__; hashable over them."""

    __slots__ = ()

    def replace(self: _F, **changes: object) -> _F:
        """A copy with some fields changed, as dataclasses.replace makes (TypeError for an unknown one)."""
        names: tuple[str, ...] = self.__slots__
        values: dict[str, object] = {name: getattr(self, name) for name in names}
        values.update(changes)
        return type(self)(**values)

    def __hash__(self) -> int:  # type: ignore[override]  # a frozen record is hashable again
        return hash(self._values())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")
