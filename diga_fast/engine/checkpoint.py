"""Run folders and checkpoints.

A run folder holds ``config.yaml`` (the resolved recipe), weights as ``*.safetensors`` (with the
model's arch, class count and label space in the header), ``state.pt`` (everything ``--resume``
needs: step, optimizer, model and teacher states, RNG states, stage extras) and ``metrics.jsonl``.
Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diga_fast.data.labels import get_label_space
from diga_fast.errors import DigaError
from diga_fast.models import SegmentationModel, build_model

FORMAT = "diga-fast/1"
WEIGHT_FILES = ("model.safetensors", "student.safetensors")  # what a run folder's model is, in order
MIN_FREE_BYTES = 64 * 2**20  # a run folder's disk must have this much free before training starts


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    """Create (or, with ``resume``, reopen) a run folder; refuse to overwrite another run, and fail
    before training when the folder cannot be written or its disk is nearly full."""
    out = Path(out)
    if resume:
        if not (out / "state.pt").is_file():
            raise DigaError(f"--resume: {out} holds no state.pt to resume from")
    else:
        if out.exists() and not out.is_dir():
            raise DigaError(f"--out {out} exists and is not a folder")
        if (out / "state.pt").exists():
            raise DigaError(f"--out {out} already holds a run; pass --resume to continue it or choose another folder")
    # A folder with a config.yaml but no state.pt is a start that failed before its first checkpoint:
    # starting again in it loses nothing.
    _check_free_space(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise DigaError(f"cannot write to --out {out}: {err.strerror or err}") from None
    return out


def _check_free_space(out: Path) -> None:
    """Refuse a run folder whose disk (that of its nearest existing ancestor) has under ``MIN_FREE_BYTES`` free."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # unreadable: the write probe reports the real problem
    if free < MIN_FREE_BYTES:
        raise DigaError(f"--out {out}: only {free / 2**20:.1f} MiB free on its disk, "
                        f"a run needs at least {MIN_FREE_BYTES // 2**20} MiB for its checkpoints")


def save_weights(path: Path, model: SegmentationModel, label_space: str, recipe_digest: str = "") -> None:
    metadata = {
        "format": FORMAT,
        "arch": model.arch,
        "num_classes": str(model.num_classes),
        "label_space": label_space,
        "recipe": recipe_digest,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def resolve_weights(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise DigaError(f"{path} holds no model weights ({' or '.join(WEIGHT_FILES)})")
    if not path.exists():
        raise DigaError(f"checkpoint not found: {path}")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise DigaError(f"{path} is not a diga-fast checkpoint (safetensors): {str(err).splitlines()[0]}") from None
    if metadata.get("format") != FORMAT:
        raise DigaError(f"{path} is a safetensors file but not a diga-fast model checkpoint")
    return metadata


def load_model(run_or_file: str | Path, expect_arch: str | None = None) -> tuple[SegmentationModel, dict[str, str]]:
    """Build the model a checkpoint describes and load its weights. Returns (model, metadata)."""
    path = resolve_weights(run_or_file)
    metadata = read_metadata(path)
    arch, num_classes = metadata["arch"], int(metadata["num_classes"])
    if expect_arch is not None and arch != expect_arch:
        raise DigaError(f"{path} holds a {arch} model, expected {expect_arch}")
    get_label_space(metadata["label_space"])
    model = build_model(arch, num_classes)
    load_state_checked(model, load_file(str(path)), str(path))
    return model, metadata


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with one clear line on any mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        kind = "is missing" if missing else "is not part of the model"
        raise DigaError(f"{source} does not fit the {getattr(module, 'arch', 'model')} model: key {key!r} {kind}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise DigaError(
                f"{source} does not fit the model: {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(state)


def save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DigaError(f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (and TensorBoard when it is installed)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional
                self.writer = None

    def write(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint being resumed from (and a last line
        cut short by a kill)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                keep.append(line)
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
