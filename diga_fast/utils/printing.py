"""Printing rich renderables whole, wherever stdout goes."""

from __future__ import annotations


def print_wide(console, renderable) -> None:
    """Print ``renderable`` (e.g. a table with a column per class) at its natural width even where that is
    wider than the console: the terminal wraps long lines, instead of rich cutting every cell to '…'.
    Widens ``console`` for good (the commands make a console per table)."""
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update(width=10_000), renderable).maximum
    console.width = max(console.width, width)
    console.print(renderable)
