"""diga-fast: DiGA (CVPR 2023) domain-adaptive semantic segmentation. Layout and the direction of
imports: docs/layout.md."""

from pathlib import Path


def with_checkout_folder(path: list[str], name: str) -> list[str]:
    """A sub-package's ``__path__`` plus the repository's top-level folder ``name`` when this is a
    source checkout.

    kernels/, cli/ and benchmarks/ stand at the top of the repository (the design's layout) but are
    no packages of their own: a folder with an ``__init__.py`` there would be found as ``kernels``
    (``cli``, ``benchmarks``) whenever the repository root is on ``sys.path`` (``python -m pytest``, a
    notebook, ``python -c`` in the root) and hide the installed package of that name. Their
    ``__init__.py`` therefore lives in diga_fast/; an install copies the folder's modules beside it
    (pyproject.toml), and in a checkout this adds the folder to the package's search path."""
    root = Path(__file__).resolve().parent.parent
    folder = root / name
    if (root / "pyproject.toml").is_file() and folder.is_dir() and str(folder) not in path:
        return [*path, str(folder)]
    return path
