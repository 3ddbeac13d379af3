"""Files written whole or not at all: every file goes to a temporary name beside its final one and is
renamed into place, so a crash never leaves a half-written checkpoint, image or JSON behind. And the
``--out`` rules of every command (:func:`check_out_folder`), which the run folder applies too."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diga_fast.errors import DigaError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


_together: list[list[tuple[Path, Path]]] = []  # open written_together blocks: (temporary, final) pairs
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` (inside
    :func:`written_together`, at the block's end with the others). A full disk is one line, the
    temporary file removed and ``path`` as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and writers that replace the file) leave 0600
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise DigaError(f"no space left on device writing {path}") from None
        raise
    if _together:
        _together[-1].append((Path(tmp), path))
    else:
        _rename(Path(tmp), path)


def _rename(tmp: Path, path: Path) -> None:
    """``tmp`` over ``path``, and the folder's entry made durable (fsync of the folder)."""
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextlib.contextmanager
def written_together():
    """The files :func:`atomic_write` writes in the block are renamed into place only once all of them
    are written (a checkpoint's weights and its state.pt always belong to the same step); if one
    fails, none replaces its old file and every temporary file is removed."""
    _together.append([])
    try:
        yield
    except BaseException:
        for tmp, _ in _together.pop():
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in _together.pop():
        _rename(tmp, path)


def torch_load_error(err: BaseException) -> str:
    """The telling line of a failed ``torch.load(..., weights_only=True)`` (not torch's advice to
    turn the safety off)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):  # the reason follows torch's advice
        telling = [line for line in lines[1:] if line.startswith(("Unsupported", "Trying to", "invalid"))]
        return telling[0] if telling else "not a file of tensors and plain values"
    return lines[0] if lines else type(err).__name__


def write_json(path: Path, data: Any) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def save_png(path: Path, array: np.ndarray) -> None:
    """Write an 8-bit PNG atomically, creating its folder: an interrupted run leaves no truncated image."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG"))


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into ``folder`` (which need not exist yet: it is created with its
    parents when the first file is written), or None when they can."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create folder {folder}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"folder {existing} is not writable"
    return None


def check_output_file(path: str | Path, option: str) -> Path:
    """Before any work: ``path`` (given as ``option``) can be written as a file: not a folder, in a
    folder that exists or can be created (:func:`make_parent` creates it). One DigaError line if not."""
    from diga_fast.errors import DigaError

    path = Path(path)
    if path.is_dir():
        raise DigaError(f"{option} {path} is a folder; give a file name")
    problem = folder_problem(path.parent)
    if problem:
        raise DigaError(f"{option}: {problem}")
    return path


def make_parent(path: str | Path, option: str = "output") -> Path:
    """Create the folder of the file ``path`` (and its parents); returns ``path``."""
    from diga_fast.errors import DigaError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DigaError(f"{option}: cannot create folder {path.parent}: {err.strerror or err}") from None
    return path


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a recipe or a dataset's labels.yaml never needs one, and nested aliases (a
    "billion laughs" bomb) make a few hundred bytes expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"YAML aliases are not accepted (line {mark.line + 1}, column {mark.column + 1})")
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """``text`` as YAML (safe types only, no aliases); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def _saved_stage(config: Path) -> str | None:
    """The ``stage`` a run folder's config.yaml names (None when unreadable)."""
    try:
        values = parse_yaml(config.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return values.get("stage") if isinstance(values, dict) else None


def run_problem(out: Path, resume: bool) -> str | None:
    """What stops a run from starting in ``out`` whatever else is asked: not a folder; on ``resume`` no
    run to resume; otherwise a run already there (its ``state.pt``, or the weights of a finished run
    whose ``state.pt`` was deleted to save space)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    if resume:
        return None if (out / "state.pt").is_file() else f"--resume: {out} holds no state.pt to resume from"
    if (out / "state.pt").exists():
        return f"--out {out} already holds a run; pass --resume to continue it or choose another folder"
    if weights := sorted(p.name for p in out.glob("*.safetensors")):
        return (f"--out {out} holds the weights of a run ({', '.join(weights)}); choose another folder "
                "or pass --force to replace it")
    return None


def check_out_folder(out: str | Path, stage: str | None = None, resume: bool = False,
                     force: bool | None = False) -> Path:
    """The ``--out`` rules of every command, before any work starts: refuse a folder that cannot be
    written, and a non-empty one unless it is this stage's run being resumed, the leftovers of this
    stage's start that failed before its first checkpoint (``config.yaml``, no ``state.pt``: starting
    again loses nothing), or ``force`` is set (then a run's ``state.pt`` and weights there are removed,
    so the new run replaces it instead of refusing to). ``force=None``: the command has no ``--force``."""
    out = Path(out)
    if problem := folder_problem(out):
        raise DigaError(f"--out {out}: {problem}")
    if resume or not out.exists():
        if problem := run_problem(out, resume):
            raise DigaError(problem)
        if resume:
            check_not_in_use(out)
        return out
    check_not_in_use(out)  # (an --out that is a file: folder_problem above)
    entries = [entry for entry in out.iterdir() if entry.name != LOCK_FILE]
    if not entries:
        return out
    if force:  # the run there is replaced: its state and weights go first
        for run_file in (out / "state.pt", *out.glob("round_*/state.pt"), *out.glob("*.safetensors"),
                         *out.glob("round_*/*.safetensors")):
            run_file.unlink(missing_ok=True)
        return out
    if stage is not None and run_problem(out, False) is None and (out / "config.yaml").is_file():
        if _saved_stage(out / "config.yaml") == stage:
            return out
    what = "a run" if run_problem(out, False) else f"{len(entries)} entries"
    ways = [*(["--resume the run in it"] if (out / "state.pt").exists() else []),
            *(["pass --force to write into it"] if force is not None else [])]
    raise DigaError(f"--out {out} is not empty (it holds {what}); choose a new folder"
                    + "".join(f"{', ' if i < len(ways) - 1 else ' or '}{way}" for i, way in enumerate(ways)))


_locks: dict[Path, int] = {}  # run folder -> the open descriptor of its .lock, while this process writes it
LOCK_FILE = ".lock"


def _try_lock(out: Path) -> int:
    """An open descriptor of ``out/.lock`` holding its exclusive lock; DigaError naming the holder when
    another process has it."""
    import fcntl

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DigaError(f"--out {out} is in use: process {holder} is writing a run there "
                        "(wait for it to end, or choose another folder)") from None
    return fd


def check_not_in_use(out: Path) -> None:
    """Refuse a run folder that another process is writing (its lock held), before anything in it is
    touched (``--force`` would otherwise delete a live run's files)."""
    out = Path(out).resolve()
    if out in _locks or not (out / LOCK_FILE).is_file():
        return
    os.close(_try_lock(out))


def lock_run_folder(out: Path) -> None:
    """Take ``out/.lock`` for this process (``fcntl.flock``, exclusive): a second writer, a run or a
    ``--resume``, gets one line naming the PID that holds it. The kernel drops the lock when its holder
    dies, so a killed run never leaves a stale one; :func:`unlock_run_folder` drops it at the end."""
    out = Path(out).resolve()
    if out in _locks:
        return
    fd = _try_lock(out)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _locks[out] = fd


def unlock_run_folder(out: Path) -> None:
    """Drop this process's lock of ``out`` (nothing when it holds none)."""
    fd = _locks.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)

