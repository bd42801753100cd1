"""Terminal output shared by the commands: tables that never cut numbers, sizes in MB."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table


def console() -> Console:
    """A rich console; when piped or narrow, wide enough that no cell is cut (``430.…``)."""
    tty = sys.stdout.isatty()
    c = Console(soft_wrap=False)
    return c if tty and c.width >= 120 else Console(width=max(200, c.width if tty else 0), soft_wrap=False)


def table(title: str, columns: list[str]) -> Table:
    t = Table(title=title)
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


def mb(n: int | float) -> str:
    return f"{n / 1e6:.2f}"
