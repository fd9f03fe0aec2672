"""Opening SQLite files that must already exist.

SQLite's default is to create a file it is asked to open. For a projection
store that is never what we want once the store exists: a query on a store
that a swap has just removed got a new, empty file instead of an error
("no such table: hosts"), and the empty file stayed behind. Every
connection to an existing store therefore opens it as a URI with
``mode=rw`` (or ``ro``), so a missing file is an error; files are created
only where a new store is made on purpose (``db.make_engine``).

No SQLAlchemy here: the rebuild's writer process imports this, and its
start-up time counts.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote


def file_uri(path: str | Path, *, readonly: bool = False) -> str:
    """``file:`` URI of ``path`` that SQLite opens only if the file exists."""
    # Percent-encode what a URI would read as its own syntax (?, #, %).
    name = quote(str(Path(path).absolute()), safe="/")
    return f"file:{name}?mode={'ro' if readonly else 'rw'}"


def connect_existing(path: str | Path, *, readonly: bool = False, **kw: Any) -> sqlite3.Connection:
    """``sqlite3.connect`` on a file that exists; ``sqlite3.OperationalError``
    ("unable to open database file") if it does not, and no file is made."""
    return sqlite3.connect(file_uri(path, readonly=readonly), uri=True, **kw)
