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


def _pk(table: Table) -> list[str]:
    return [c.name for c in table.primary_key.columns]


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
        for table, rows in self.pending.items():
            pk = _pk(table)
            deletes = [k for k, (kind, _) in rows.items() if kind == _DELETE]
            upserts = [v for (kind, v) in rows.values() if kind == _UPSERT]
            patches: dict[frozenset[str], list[dict[str, Any]]] = defaultdict(list)
            for key, (kind, values) in rows.items():
                if kind == _PATCH:
                    params = {f"_k_{c}": k for c, k in zip(pk, key, strict=True)}
                    params.update(values)
                    patches[frozenset(values)].append(params)
            if deletes:
                where = and_(*(table.c[c] == bindparam(f"_k_{c}") for c in pk))
                await conn.execute(
                    delete(table).where(where),
                    [{f"_k_{c}": k for c, k in zip(pk, key, strict=True)} for key in deletes],
                )
            if upserts:
                await conn.execute(_upsert_stmt(conn, table, pk), upserts)
            for cols, params in patches.items():
                where = and_(*(table.c[c] == bindparam(f"_k_{c}") for c in pk))
                stmt = update(table).where(where).values({c: bindparam(c) for c in sorted(cols)})
                await conn.execute(stmt, params)
        self.pending.clear()


def _upsert_stmt(conn: AsyncConnection, table: Table, pk: list[str]) -> Any:
    dialect = conn.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise NotImplementedError(f"no upsert for the {dialect} dialect")
    stmt = insert(table)
    others = [c.name for c in table.columns if c.name not in pk]
    return stmt.on_conflict_do_update(index_elements=pk, set_={c: stmt.excluded[c] for c in others})
