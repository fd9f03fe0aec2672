"""What a command handler is: one verb, its permission, boundary, fold and decision."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from stratus.events.commands import Command
from stratus.events.model import Cause, Event


class Handler(msgspec.Struct, frozen=True):
    """Everything the command service needs to run one verb.

    ``permission`` names the entry of ``handlers.rbac.PERMISSIONS`` that
    guards the verb, and ``tenant_of`` the tenant whose resource the command
    touches (None for cloud-wide ones). ``prepare(command, caller, service)``,
    if given, runs first and may read other state or do slow work (hashing a
    password) off the decision; it returns what ``decide`` gets. A hook that
    only reads cloud-wide objects is written against the narrow
    ``handlers.lookup.Lookup`` and wrapped with ``with_lookup``. ``boundary``
    names the subject (or filter) whose state the decision reads and whose
    last sequence the append is conditioned on; ``decide(state, command,
    cause)`` is pure and either returns the events or raises a
    ``StratusError``; ``view`` turns the resulting state into the reply's
    ``data``.
    """

    verb: str
    command: type[Command]
    permission: str
    boundary: Callable[[Any], str]
    initial: Callable[[], Any]
    fold: Callable[[Any, Event], Any]
    decide: Callable[[Any, Any, Cause], list[Event]]
    view: Callable[[Any], Any] | None = None
    tenant_of: Callable[[Any], str | None] | None = None
    prepare: Callable[[Any, Any, Any], Awaitable[Any]] | None = None
    # When one verb decides on boundaries of different kinds (revoking one
    # token, or every token of a user): the initial state for a boundary.
    initial_for: Callable[[str], Any] | None = None
    # A second boundary the decision reads and writes to (a pool of addresses
    # another tenant may draw from at the same time): with it, ``decide``
    # gets ``(state, second_state)`` and appends to both. Both conditions go
    # into one atomic batch, so neither can move unnoticed.
    also: Callable[[Any], str] | None = None
    also_initial: Callable[[], Any] | None = None
    also_fold: Callable[[Any, Event], Any] | None = None
    # Instead of ``view``: the reply's data from the state and the events just
    # appended (which of a tenant's many resources the command touched).
    result: Callable[[Any, list[Event]], Any] | None = None


class Special(msgspec.Struct, frozen=True):
    """A verb that is not one decision on one boundary (logging in)."""

    verb: str
    command: type[Command]
    permission: str
    run: Callable[[Any, Any, Cause], Awaitable[Any]]
    # For a verb on a tenant's resource: the tenant whose roles authorise it
    # (the command's ``tenant``, filled with the caller's when left out).
    tenant_of: Callable[[Any], str | None] | None = None


def on_aggregate(
    subject: Callable[[str], str],
    initial: Callable[[], Any],
    fold: Callable[[Any, Event], Any],
    view: Callable[[Any], Any],
) -> Callable[..., Handler]:
    """How to make the verbs decided on one aggregate of a kind (a user, a
    tenant): ``make(verb, command, field, decide, **kw)`` decides on
    ``subject(command.<field>)``, guarded by the permission named as the verb."""

    def make(verb: str, command: type[Command], field: str, decide: Any, **kw: Any) -> Handler:
        return Handler(
            verb=verb,
            command=command,
            permission=verb,
            boundary=lambda c: subject(getattr(c, field)),
            initial=initial,
            fold=fold,
            decide=decide,
            view=view,
            **kw,
        )

    return make
