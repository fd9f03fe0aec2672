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


def uuid7() -> uuid.UUID:
    """A UUIDv7 whose 12-bit ``rand_a`` is a counter within one millisecond.

    The counter (RFC 9562, method 1) keeps ids minted in the same
    millisecond in creation order, which the audit trail relies on.
    """
    global _last_ms, _counter
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
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand
    return uuid.UUID(int=value)


def new_id() -> str:
    return str(uuid7())


def is_name(value: str) -> bool:
    return bool(NAME_RE.match(value))


def is_token(value: str) -> bool:
    return bool(TOKEN_RE.match(value))
