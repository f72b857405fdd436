"""Tables of legal moves: a machine's phase is one enum, and every move it
may make is written in one table, as h11 keeps its (python-hyper/h11
``h11/_state.py``). The front ends' dialogues and connections use them
(:mod:`proxy.frontends.base`), and so does a session's connection to the
directory (:mod:`proxy.backends.ldap`), a layer below them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar


class Phases(enum.Enum):
    """An enum whose members hash as the objects they are (each is one
    object, equal only to itself), in C: ``enum.Enum`` hashes a member by
    its name in Python, and a phase is looked up in a table or a set on
    every event of a session (a move, whether it has ended), as is a
    decision's reason. Their values stay what they were."""

    __hash__ = object.__hash__


class IllegalMove(RuntimeError):
    """A machine was told of an event its phase does not take: a bug in
    the code that drives it, never something a client or backend can cause."""


P = TypeVar("P", bound=enum.Enum)


class Moves(Generic[P]):
    """Every legal move of one machine in one table, as h11 keeps its
    (python-hyper/h11 ``h11/_state.py``): ``after(phase, event)`` is the
    next phase, and any move not in the table raises :class:`IllegalMove`.
    A self-loop written in the table (an event that changes nothing in that
    phase) is legal; one left out is not."""

    def __init__(self, machine: str, table: Mapping[P, Mapping[str, P]]) -> None:
        self.machine = machine
        self._table = {phase: dict(moves) for phase, moves in table.items()}

    def after(self, phase: P, event: str) -> P:
        try:
            return self._table[phase][event]
        except KeyError:
            raise IllegalMove(f"{self.machine}: no move {event!r} from {phase.name}") from None

    def legal(self) -> Iterator[tuple[P, str, P]]:
        """Every legal move: (phase, event, next phase)."""
        for phase, moves in self._table.items():
            for event, after in moves.items():
                yield phase, event, after

    def events(self) -> set[str]:
        return {event for _, event, _ in self.legal()}
