"""Several processes under ``torchrun`` (one per GPU, or CPU processes with gloo).

``torchrun --nproc_per_node N -m diga_fast.cli.main train ...`` (or ``torchrun ... $(which diga)``)
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`setup` (called through ``resolve_device`` by every
command) then joins the process group: NCCL with one GPU per local rank, gloo on CPU.

The rule that keeps the ranks in step, and a run on N processes equal to a run on one process with N
times the batch: every rank holds the same *global* batch description and takes its own rows.
* data: batch ``k`` is stream positions ``[k*B*N, (k+1)*B*N)``; rank r reads rows ``[r*B, (r+1)*B)``
  with the per-sample seeds of their global positions (:mod:`diga_fast.data.loader`);
* random draws of the training loop (strong augmentation, ClassMix choices): a
  :class:`ShardedGenerator` seeded alike on every rank draws for the global batch, each rank keeps
  its rows, so each image gets its own draws and all generators stay in the same state;
* gradients: DDP averages them; losses that average over a data-dependent number of pixels are
  rescaled by :func:`global_mean` so the average runs over the global batch's pixels;
* BatchNorm statistics: SyncBatchNorm on CUDA; the running buffers are averaged after each step
  (:func:`average_buffers`) so the EMA teacher, which also averages buffers, stays identical;
* centroids: the per-image class sums are gathered in rank order (:func:`gather_rows`) and applied
  in the global batch order;
* only rank 0 writes the run folder, prints progress and logs; evaluation, pseudo-labels and initial
  centroids are computed on shards and combined.
With one process every helper here is a no-op, so single-process results are unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diga_fast.errors import DigaError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' own tensors live (NCCL: this GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_current = DistInfo()
DEFAULT_TIMEOUT_MINUTES = 10.0  # well beyond the longest wait of a run (a rank saving, the last shard of an evaluation)
_timeout_minutes = DEFAULT_TIMEOUT_MINUTES


@contextlib.contextmanager
def collective(name: str):
    """A collective that fails (a rank frozen past the process group's timeout, or dead) ends in one
    line naming it, so that torchrun sees a failure instead of a hang or a backend traceback."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistBackendError is one; gloo raises plain ones
        text = str(err)
        backend = getattr(dist, "DistBackendError", ())
        if not _current.enabled or not (isinstance(err, backend) or any(
                sign in text for sign in ("imed out", "Connection closed", "Connection reset", "NCCL"))):
            raise  # not the process group's: an ordinary error of the step (out of memory, ...)
        first = " ".join(text.split())[:200]
        raise DigaError(f"{name} on rank {_current.rank} of {_current.world} failed: no answer from every rank within "
                        f"{_timeout_minutes:g} min, or a rank died ({first}); stopping") from None


def current() -> DistInfo:
    return _current


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device, timeout_minutes: float | None = None) -> torch.device:
    """Join the process group torchrun describes (once; collectives time out after ``timeout_minutes``,
    ``train.dist_timeout_minutes``); returns this rank's device (CUDA: the GPU of the local rank,
    whatever ``device`` named)."""
    global _current, _timeout_minutes
    if not launched():
        return device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DigaError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                            "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _timeout_minutes = timeout_minutes or DEFAULT_TIMEOUT_MINUTES
        timeout = datetime.timedelta(minutes=_timeout_minutes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timeout, store=_attempt_store(world, timeout))
    _current = DistInfo(rank, world, local_rank, device)
    return device


def _attempt_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's workers share its agent's TCPStore, across restarts too (``--max-restarts``); torch
    (2.13) keys the process group's rendezvous there without the attempt, so restarted workers read the
    dead ones' addresses and fail to connect. Each attempt gets its own prefix. None (torch's own
    ``env://`` store) when the agent's store is not in use."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"/diga/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    """Leave the process group at the end of a command that succeeded on every rank: a barrier first,
    so that no rank tears down connections another is still using (gloo aborts the process then)."""
    global _current
    if dist.is_available() and dist.is_initialized():
        with collective("the barrier at the end of the command"):
            dist.barrier()
        dist.destroy_process_group()
    _current = DistInfo()


def on_main(fn) -> None:
    """Call ``fn()`` on rank 0 only; a :class:`DigaError` there is raised on every rank (so no rank
    waits forever for one that stopped)."""
    error = None
    if _current.is_main:
        try:
            fn()
        except DigaError as err:
            error = str(err)
    if _current.enabled:
        box = [error]
        with collective("the broadcast of rank 0's result"):
            dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise DigaError(error)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank (all ranks get the same answer)."""
    if not _current.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=_current.device)).item())


def barrier() -> None:
    if _current.enabled:
        with collective("a barrier"):
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (returns ``tensor``)."""
    if _current.enabled:
        with collective(f"an all-reduce of {tuple(tensor.shape)}"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (all ranks get the result)."""
    if not _current.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_current.world)]
    with collective(f"an all-gather of {tuple(tensor.shape)}"):
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def global_mean(loss: torch.Tensor, count: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``loss`` is this rank's mean over ``count()`` items (pixels); rescale it so that DDP's gradient
    average equals the gradient of the mean over all ranks' items: loss * N * count / sum(count).
    ``count`` is only called under torchrun, so a single process pays nothing."""
    if not _current.enabled:
        return loss
    mine = count().detach().to(_current.device, torch.float64).reshape(1)
    total = all_reduce_sum(mine.clone())
    return loss * (_current.world * mine / total.clamp(min=1)).to(loss.dtype).squeeze(0)


def _average(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over ranks in place, in one collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    with collective(f"the average of {len(tensors)} tensors (gradients or BatchNorm statistics)"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(_current.world)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def average_gradients(parameters) -> None:
    """Average the gradients of ``parameters`` over ranks (what DDP does, for networks run several
    times per step, like the translator's generators and discriminators)."""
    if _current.enabled:
        _average([p.grad for p in parameters if p.grad is not None])


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, in place."""
    if _current.enabled:
        _average([b for b in module.buffers() if b.is_floating_point()])


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (SyncBatchNorm first on CUDA); ``model`` itself when
    alone. Call the wrapper for the training forward pass; save and EMA from ``model``."""
    if not _current.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # buffers are averaged after each step (average_buffers), not broadcast from rank 0 per forward
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def fingerprint(tensors) -> torch.Tensor:
    """A float64 [2] summary (sum, sum of |x| weighted by position) of ``tensors`` to compare ranks."""
    total = torch.zeros(2, dtype=torch.float64)
    for tensor in tensors:
        flat = tensor.detach().double().flatten().cpu()
        total[0] += flat.sum()
        total[1] += (flat.abs() * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum()
    return total


class ShardedGenerator:
    """A CPU ``torch.Generator`` that every rank seeds alike and that draws for the global batch:
    :meth:`rand` returns this rank's rows. Alone, it is the plain generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def rand(self, rows: int, *shape: int) -> torch.Tensor:
        info = _current
        draws = torch.rand(rows * info.world, *shape, generator=self.generator)
        return draws[info.rank * rows:(info.rank + 1) * rows] if info.enabled else draws

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def random_rows(generator, rows: int, *shape: int) -> torch.Tensor:
    """``torch.rand(rows, *shape)`` from ``generator`` (a :class:`ShardedGenerator`, a torch
    ``Generator`` or None for the global RNG), on the CPU."""
    if isinstance(generator, ShardedGenerator):
        return generator.rand(rows, *shape)
    return torch.rand(rows, *shape, generator=generator)
