"""``-o table|json|yaml`` for every read and create command."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Sequence
from typing import Any


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


def emit(data: Any, fmt: Format, columns: Sequence[str] | None = None, title: str | None = None):
    # yaml and rich are imported only by the format that needs them.
    if fmt is Format.json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    elif fmt is Format.yaml:
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        from rich.console import Console
        from rich.table import Table

        # Piped output is not cut to 80 columns.
        console = Console(width=None if sys.stdout.isatty() else 160)
        if isinstance(data, list):
            cols = list(columns or (data[0].keys() if data else []))
            t = Table(title=title, show_lines=False)
            for c in cols:
                t.add_column(c)
            for row in data:
                t.add_row(*(_cell(row.get(c)) for c in cols))
            console.print(t)
        elif isinstance(data, dict):
            t = Table(show_header=False, title=title)
            t.add_column("field", style="bold")
            t.add_column("value")
            for k, v in data.items():
                t.add_row(k, _cell(v))
            console.print(t)
        else:
            console.print(data)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)
