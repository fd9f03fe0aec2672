"""Identifiers: UUIDv7, so ids sort by creation time (RFC 9562)."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_random = b""
_random_at = 0

# The lookahead refuses a trailing newline, which Python's `$` would accept;
# it reads the same as a JSON Schema (ECMA) pattern.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}(?!\n)$")
# A tenant resource's name (see ``events.resources.ResourceName``): what
# OpenStack tools put in names, or nothing.
RESOURCE_NAME_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,62})?(?!\n)$")
# Ids that reach a subject token: no dots, wildcards or white space.
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}(?!\n)$")
# Display names are free text: any printable character, not only white
# space, no control characters (C0, DEL, C1, line and paragraph separators:
# they would rewrite a terminal or split a log line).
DISPLAY_NAME_RE = re.compile(r"^(?=.*\S)[^\x00-\x1f\x7f-\x9f\u2028\u2029]{1,128}(?!\n)$")


def _forget_random() -> None:
    # A forked child must not mint ids from its parent's page of random bits.
    global _random, _random_at
    _random, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random)


def _uuid7_int() -> int:
    """A UUIDv7 as an integer, its 12-bit ``rand_a`` a counter within one
    millisecond.

    The counter (RFC 9562, method 1) keeps ids minted in the same
    millisecond in creation order, which the audit trail relies on.
    """
    global _last_ms, _counter, _random, _random_at
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            _counter += 1
            if _counter > 0xFFF:
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        else:
            _last_ms = ms
            _counter = 0
        counter = _counter
        # Random bits from the OS a page at a time: one system call per 512
        # ids rather than one each (a scheduler mints two a placement).
        if _random_at >= len(_random):
            _random, _random_at = os.urandom(4096), 0
        rand = int.from_bytes(_random[_random_at : _random_at + 8], "big") & ((1 << 62) - 1)
        _random_at += 8
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand
    return value


def uuid7() -> uuid.UUID:
    """A UUIDv7 (see ``_uuid7_int``)."""
    return uuid.UUID(int=_uuid7_int())


def new_id() -> str:
    """A UUIDv7 in its usual text form, formatted here: ``str(UUID(...))``
    costs as much again as minting it."""
    h = f"{_uuid7_int():032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_name(value: str) -> bool:
    return bool(NAME_RE.match(value))


def is_token(value: str) -> bool:
    return bool(TOKEN_RE.match(value))
