"""What a command handler is: one verb, its boundary, fold and decision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from stratus.events.commands import Command
from stratus.events.model import Cause, Event


class Handler(msgspec.Struct, frozen=True):
    """Everything the command service needs to run one verb.

    ``boundary`` names the subject (or filter) whose state the decision
    reads and whose last sequence the append is conditioned on;
    ``decide(state, command, cause)`` is pure and either returns the events
    or raises a ``StratusError``; ``view`` turns the resulting state into the
    reply's ``data``.
    """

    verb: str
    command: type[Command]
    boundary: Callable[[Any], str]
    initial: Callable[[], Any]
    fold: Callable[[Any, Event], Any]
    decide: Callable[[Any, Any, Cause], list[Event]]
    view: Callable[[Any], Any] | None = None
