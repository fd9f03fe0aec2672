"""Tables every projection store has, besides the views' own."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
)

# Events that failed to decode or to apply: kept, counted, never blocking.
quarantine = Table(
    "quarantine",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("subject", String(512), nullable=False),
    Column("error", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("attempts", Integer, nullable=False, default=1),
)

# Each view's table layout as it was when its rows were written: a view whose
# layout changed since is rebuilt from the log, instead of migrated by hand.
view_schemas = Table(
    "view_schemas",
    metadata,
    Column("view", String(64), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
)
