"""``diga weights``: what a local weight file is and which options take it."""

from __future__ import annotations

from diga_fast.models.weights_inspect import inspect_weights


def inspect_weight_file(path: str) -> dict:
    """:func:`diga_fast.models.weights_inspect.inspect_weights` of ``path`` (a file, or a folder's weight file)."""
    return inspect_weights(path)
