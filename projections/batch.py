"""Row operations folded in memory and written as a few ``executemany`` calls.

A view's ``apply(seq, event)`` returns row operations. The projector folds a
whole batch of events into one ``RowBatch``, collapsing operations on the
same row (an upsert then a patch is one upsert), and writes each table with
at most one DELETE, one INSERT .. ON CONFLICT and one UPDATE per column set,
all in the transaction that also moves the checkpoint. One statement per row
was 57x slower on this machine (DESIGN.md).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Collection
from datetime import UTC
from typing import Any

import msgspec
from sqlalchemy import DateTime, Table, and_, bindparam, delete, insert, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from stratus.projections.writer import sqlite_datetime


class Upsert(msgspec.Struct, frozen=True):
    table: Table
    row: dict[str, Any]


class Patch(msgspec.Struct, frozen=True):
    table: Table
    key: tuple[Any, ...]
    values: dict[str, Any]


class Delete(msgspec.Struct, frozen=True):
    table: Table
    key: tuple[Any, ...]


Op = Upsert | Patch | Delete

# SQL, its parameter rows, and the positions in each row of the SQLite dates
# left as UTC datetimes (``keep_dates``): a writer process (``writer``) gets
# those as msgpack timestamps and formats them itself (``sqlite_datetime``),
# which took a tenth of the replay's time here. Any other date (naive, or
# with another offset, whose wall time is what SQLite keeps) is formatted
# at once.
Statement = tuple[str, list[Any], tuple[int, ...]]

_UPSERT, _PATCH, _DELETE = 0, 1, 2


_PK_CACHE: dict[Table, tuple[str, ...]] = {}


def _pk(table: Table) -> tuple[str, ...]:
    pk = _PK_CACHE.get(table)
    if pk is None:
        pk = _PK_CACHE[table] = tuple(c.name for c in table.primary_key.columns)
    return pk


# table -> the parameter names of its primary key in UPDATE and DELETE
_KEY_PARAMS: dict[Table, tuple[str, ...]] = {}


def _key_params(table: Table) -> tuple[str, ...]:
    names = _KEY_PARAMS[table] = tuple(f"_k_{c}" for c in _pk(table))
    return names


class RowBatch:
    def __init__(self) -> None:
        # table -> primary key -> (op, values)
        self.pending: dict[Table, dict[tuple[Any, ...], tuple[int, dict[str, Any]]]] = defaultdict(
            dict
        )

    def __len__(self) -> int:
        return sum(len(v) for v in self.pending.values())

    def add(self, op: Op) -> None:
        """Fold ``op`` in. The batch takes over the op's dict: views build a
        fresh one per op, so copying it would only cost time."""
        rows = self.pending[op.table]
        if type(op) is Upsert:
            pk = _PK_CACHE.get(op.table) or _pk(op.table)
            key = (op.row[pk[0]],) if len(pk) == 1 else tuple(op.row[c] for c in pk)
            rows[key] = (_UPSERT, op.row)
        elif type(op) is Patch:
            prev = rows.get(op.key)
            if prev is None:
                rows[op.key] = (_PATCH, op.values)
            elif prev[0] == _UPSERT:
                prev[1].update(op.values)
            elif prev[0] == _PATCH:
                rows[op.key] = (_PATCH, {**prev[1], **op.values})
        else:
            rows[op.key] = (_DELETE, {})

    def statements(
        self, dialect: Any, tables: Collection[str] | None = None, *, keep_dates: bool = False
    ) -> list[Statement]:
        """The SQL and parameter rows that write this batch, in a safe order.

        ``tables``: only the rows of the tables so named (the rest stay
        pending); all of them by default. ``keep_dates``: see ``Statement``.
        """
        out: list[Statement] = []
        for table, rows in self.pending.items():
            if tables is not None and table.name not in tables:
                continue
            params_of = _KEY_PARAMS.get(table) or _key_params(table)
            deletes: list[dict[str, Any]] = []
            upserts: list[dict[str, Any]] = []
            patches: dict[frozenset[str], list[dict[str, Any]]] = defaultdict(list)
            for key, (kind, values) in rows.items():
                if kind == _UPSERT:
                    upserts.append(values)
                    continue
                params = dict(zip(params_of, key, strict=True))
                if kind == _DELETE:
                    deletes.append(params)
                else:
                    params.update(values)
                    patches[frozenset(values)].append(params)
            if deletes:
                stmt = _compiled(dialect, table, "delete", frozenset())
                out.append(stmt.statement(stmt.rows(deletes, keep_dates), keep_dates))
            if upserts:
                stmt = _compiled(dialect, table, "upsert", frozenset())
                out.append(stmt.statement(stmt.rows(upserts, keep_dates), keep_dates))
            for cols, params in patches.items():
                stmt = _compiled(dialect, table, "patch", cols)
                out.append(stmt.statement(stmt.rows(params, keep_dates), keep_dates))
            rows.clear()
        if tables is None:
            self.pending.clear()
        return out

    async def flush(self, conn: AsyncConnection) -> None:
        for sql, rows, _ in self.statements(conn.dialect):
            await conn.exec_driver_sql(sql, rows)

    def flush_sync(self, conn: Connection, tables: Collection[str] | None = None) -> None:
        for sql, rows, _ in self.statements(conn.dialect, tables):
            conn.exec_driver_sql(sql, rows)


class _Statement:
    """A statement compiled once per dialect, run with driver-level executemany.

    SQLAlchemy's per-row parameter processing cost more than SQLite's own
    work here; binding tuples in the compiled order, converting only the
    columns whose type needs it (dates on SQLite), halves a flush.
    """

    def __init__(self, sql: str, names: list[str], converters: list[Any]) -> None:
        self.sql = sql
        self.names = names
        self.get = operator.itemgetter(*names) if len(names) > 1 else None
        self.convert = [(n, f) for n, f in zip(names, converters, strict=True) if f is not None]
        # SQLite's dates, by position: the ones ``keep_dates`` leaves alone.
        self.dates = tuple(i for i, f in enumerate(converters) if f is sqlite_datetime)
        self.convert_now = [(n, f) for n, f in self.convert if f is not sqlite_datetime]

    def statement(self, rows: list[Any], keep_dates: bool) -> Statement:
        return (self.sql, rows, self.dates if keep_dates else ())

    def lists(self, rows: list[list[Any]], keep_dates: bool = False) -> list[list[Any]]:
        """Rows given as value lists in the statement's order, converted in
        place (an ``insert`` statement's order is the table's columns)."""
        for name, f in self.convert if not keep_dates else self.convert_now:
            i = self.names.index(name)
            for r in rows:
                v = r[i]
                if v is not None:
                    r[i] = f(v)
        if keep_dates:
            for i in self.dates:
                for r in rows:
                    v = r[i]
                    if v is not None and v.tzinfo is not UTC:
                        r[i] = sqlite_datetime(v)
        return rows

    def rows(self, params: list[dict[str, Any]], keep_dates: bool = False) -> list[tuple[Any, ...]]:
        # The batch owns these dicts (see RowBatch.add): convert in place,
        # then let itemgetter build each tuple in C.
        for name, f in self.convert if not keep_dates else self.convert_now:
            for p in params:
                v = p[name]
                if v is not None:
                    p[name] = f(v)
        if keep_dates:
            for i in self.dates:
                name = self.names[i]
                for p in params:
                    v = p[name]
                    if v is not None and v.tzinfo is not UTC:
                        p[name] = sqlite_datetime(v)
        if self.get is None:
            name = self.names[0]
            return [(p[name],) for p in params]
        return list(map(self.get, params))


_COMPILED: dict[tuple[str, Table, str, frozenset[str]], _Statement] = {}


def _compiled(dialect: Any, table: Table, kind: str, cols: frozenset[str]) -> _Statement:
    key = (dialect.name, table, kind, cols)
    stmt = _COMPILED.get(key)
    if stmt is not None:
        return stmt
    pk = _pk(table)
    where = and_(*(table.c[c] == bindparam(f"_k_{c}") for c in pk))
    if kind == "delete":
        clause: Any = delete(table).where(where)
    elif kind == "upsert":
        clause = _upsert_clause(dialect.name, table, pk)
    elif kind == "insert":
        clause = insert(table)
    else:
        clause = update(table).where(where).values({c: bindparam(c) for c in sorted(cols)})
    compiled = clause.compile(dialect=dialect)
    names = list(compiled.positiontup or [])
    types = {c.name: c.type for c in table.columns}
    types.update({f"_k_{c}": table.c[c].type for c in pk})
    converters = [_converter(types[n], dialect) for n in names]
    stmt = _COMPILED[key] = _Statement(str(compiled), names, converters)
    return stmt


def insert_statement(dialect: Any, table: Table) -> _Statement:
    """A plain INSERT of every column, in the table's column order (rows
    bound with ``lists``): for a new store's append-only rows."""
    return _compiled(dialect, table, "insert", frozenset())


def _converter(typ: Any, dialect: Any) -> Any:
    if dialect.name == "sqlite" and isinstance(typ, DateTime):
        return sqlite_datetime
    return typ.dialect_impl(dialect).bind_processor(dialect)


def _upsert_clause(dialect: str, table: Table, pk: tuple[str, ...]) -> Any:
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise NotImplementedError(f"no upsert for the {dialect} dialect")
    stmt = insert(table)
    others = [c.name for c in table.columns if c.name not in pk]
    return stmt.on_conflict_do_update(
        index_elements=list(pk), set_={c: stmt.excluded[c] for c in others}
    )
