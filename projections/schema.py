"""Tables every projection store has, besides the views' own."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Enum,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
)

metadata = MetaData()


@event.listens_for(metadata, "after_create")
def _binary_collation(_target: MetaData, connection: Any, tables: Any = (), **_kw: Any) -> None:
    """Text compares and sorts by code point on PostgreSQL, as on SQLite.

    A PostgreSQL database usually collates linguistically (en_US, ICU), so
    ``ORDER BY id`` and the digest's row order would differ from SQLite's
    binary order for the same log ("_system" sorts after "0a" on one and
    before it on the other). ``COLLATE "C"`` on every text column of every
    table created here, present and future, makes both backends agree.
    """
    if connection.dialect.name != "postgresql":
        return
    prep = connection.dialect.identifier_preparer
    for table in tables or ():
        alters = [
            f"ALTER COLUMN {prep.quote(c.name)} TYPE "
            f'{c.type.compile(dialect=connection.dialect)} COLLATE "C"'
            for c in table.columns
            if isinstance(c.type, String)
            and not isinstance(c.type, Enum)
            and c.type.collation is None
        ]
        if alters:
            connection.exec_driver_sql(
                f"ALTER TABLE {prep.format_table(table)} {', '.join(alters)}"
            )


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

# Which projector may write this store (PostgreSQL, several candidates; see
# ``projections.leased``): the lease it holds in the KV bucket, by the
# bucket's generation and the revision that took the key. A projector checks
# this row inside each of its write transactions; a new holder moves it on,
# which fences the previous one out.
projector_leases = Table(
    "projector_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("holder", String(256), nullable=False),
    Column("since", DateTime(timezone=True), nullable=False),
)
