"""Row operations folded in memory and written as a few ``executemany`` calls.

A view's ``apply(seq, event)`` returns row operations. The projector folds a
whole batch of events into one ``RowBatch``, collapsing operations on the
same row (an upsert then a patch is one upsert), and writes each table with
at most one DELETE, one INSERT .. ON CONFLICT and one UPDATE per column set,
all in the transaction that also moves the checkpoint. One statement per row
was 57x slower on this machine (DESIGN.md).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec
from sqlalchemy import Table, and_, bindparam, delete, update
from sqlalchemy.ext.asyncio import AsyncConnection


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

_UPSERT, _PATCH, _DELETE = 0, 1, 2


_PK_CACHE: dict[Table, tuple[str, ...]] = {}


def _pk(table: Table) -> tuple[str, ...]:
    pk = _PK_CACHE.get(table)
    if pk is None:
        pk = _PK_CACHE[table] = tuple(c.name for c in table.primary_key.columns)
    return pk


class RowBatch:
    def __init__(self) -> None:
        # table -> primary key -> (op, values)
        self.pending: dict[Table, dict[tuple[Any, ...], tuple[int, dict[str, Any]]]] = defaultdict(
            dict
        )

    def __len__(self) -> int:
        return sum(len(v) for v in self.pending.values())

    def add(self, op: Op) -> None:
        rows = self.pending[op.table]
        if isinstance(op, Upsert):
            key = tuple(op.row[c] for c in _pk(op.table))
            rows[key] = (_UPSERT, dict(op.row))
        elif isinstance(op, Patch):
            prev = rows.get(op.key)
            if prev is None:
                rows[op.key] = (_PATCH, dict(op.values))
            elif prev[0] != _DELETE:
                prev[1].update(op.values)
        else:
            rows[op.key] = (_DELETE, {})

    async def flush(self, conn: AsyncConnection) -> None:
        dialect = conn.dialect
        for table, rows in self.pending.items():
            pk = _pk(table)
            deletes: list[dict[str, Any]] = []
            upserts: list[dict[str, Any]] = []
            patches: dict[frozenset[str], list[dict[str, Any]]] = defaultdict(list)
            for key, (kind, values) in rows.items():
                if kind == _UPSERT:
                    upserts.append(values)
                    continue
                params = {f"_k_{c}": k for c, k in zip(pk, key, strict=True)}
                if kind == _DELETE:
                    deletes.append(params)
                else:
                    params.update(values)
                    patches[frozenset(values)].append(params)
            if deletes:
                await _run(conn, _compiled(dialect, table, "delete", frozenset()), deletes)
            if upserts:
                await _run(conn, _compiled(dialect, table, "upsert", frozenset()), upserts)
            for cols, params in patches.items():
                await _run(conn, _compiled(dialect, table, "patch", cols), params)
        self.pending.clear()


class _Statement:
    """A statement compiled once per dialect, run with driver-level executemany.

    SQLAlchemy's per-row parameter processing cost more than SQLite's own
    work here; binding tuples in the compiled order, converting only the
    columns whose type needs it (dates on SQLite), halves a flush.
    """

    def __init__(self, sql: str, names: list[str], converters: list[Any]) -> None:
        self.sql = sql
        self.names = names
        self.converters = converters

    def rows(self, params: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        names, conv = self.names, self.converters
        if not any(conv):
            return [tuple(p[n] for n in names) for p in params]
        return [
            tuple(
                (f(p[n]) if (f is not None and p[n] is not None) else p[n])
                for n, f in zip(names, conv, strict=True)
            )
            for p in params
        ]


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
    else:
        clause = update(table).where(where).values({c: bindparam(c) for c in sorted(cols)})
    compiled = clause.compile(dialect=dialect)
    names = list(compiled.positiontup or [])
    types = {c.name: c.type for c in table.columns}
    types.update({f"_k_{c}": table.c[c].type for c in pk})
    converters = [types[n].dialect_impl(dialect).bind_processor(dialect) for n in names]
    stmt = _COMPILED[key] = _Statement(str(compiled), names, converters)
    return stmt


async def _run(conn: AsyncConnection, stmt: _Statement, params: list[dict[str, Any]]) -> None:
    await conn.exec_driver_sql(stmt.sql, stmt.rows(params))


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
