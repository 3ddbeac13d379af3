"""Data loaders that give the same batches for the same seed, whatever the number of workers, and
that resume mid-run without replaying the data.

How: the batch sampler yields ``(index, sample_seed)`` pairs instead of bare indices, and
:class:`SeededSamples` reseeds torch's global (CPU) RNG with ``sample_seed`` around each sample's
``__getitem__``, so every random draw of the transforms is a function of ``(seed, position)`` alone,
where ``position`` counts samples drawn since the start of the run. Epoch ``e`` visits the dataset in
the order ``randperm(n)`` with a generator seeded from ``(seed, e)`` (no shuffle: in order).

Resume (``InfiniteLoader(..., start_step=k)``): batch ``k`` covers
stream positions ``[k*B, (k+1)*B)``, whose epoch, permutation and per-sample seeds follow directly
from the numbers, so resuming costs nothing and yields exactly the batches the uninterrupted run would
have seen. This is the cheap equivalent of "restart the epoch with seed + epoch and skip the consumed
batches": no batch is read twice, and worker start-up order or prefetching cannot change a batch.

The infinite stream concatenates epochs, so a batch can straddle two epochs and a dataset smaller
than the batch still works (the official loaders repeat their id list to cover all iterations, the
same thing).

Worker processes also get numpy and ``random`` seeded (``seed_worker``) for code outside these
transforms; those draws are per worker, not per sample, so they depend on the number of workers.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diga_fast.data.transforms import at_batch_row

from diga_fast.utils import dist

__all__ = ["InfiniteLoader", "SeededSamples", "seed_worker", "sample_seed", "epoch_order"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(seed: int, value: int) -> int:
    """A 63-bit seed from two integers; nearby inputs give unrelated outputs (so run seed 1 is not
    run seed 0 shifted by an epoch)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (value & _MASK64)) >> 1


def sample_seed(seed: int, position: int) -> int:
    """The torch seed of the sample at stream ``position`` of a run seeded with ``seed``."""
    return _mix(seed, 2 * position + 1)


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> torch.Tensor:
    """The dataset indices of epoch ``epoch``, in visiting order."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 2 * epoch)))


@contextmanager
def _torch_seeded(seed: int):
    """Seed torch's CPU RNG for a block and restore the previous state afterwards (so loading with
    ``num_workers=0`` does not disturb the training loop's own random stream; CUDA RNGs untouched)."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class SeededSamples(Dataset):
    """Wraps a dataset: ``self[(index, seed, row)]`` reads ``dataset[index]`` with torch's RNG seeded by
    ``seed``, as row ``row`` of its batch (for :class:`~diga_fast.data.transforms.ResizeByRow`);
    ``self[index]`` reads it unseeded. Other attributes are looked up on the dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed, row = key
            with _torch_seeded(seed), at_batch_row(row):
                return self.dataset[index]
        return self.dataset[key]

    def __getattr__(self, name: str):
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _StreamBatchSampler(Sampler):
    """Endless batches over the concatenation of epochs, starting at batch ``start_step``. With
    ``world`` > 1 processes a global batch spans ``batch_size * world`` stream positions and this
    ``rank`` takes rows ``[rank * batch_size, (rank + 1) * batch_size)`` of it."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.start_step, self.rank, self.world = start_step, rank, world

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stride = self.batch_size * self.world
        position = self.start_step * stride + self.rank * self.batch_size
        epoch, order = -1, []
        while True:
            batch = []
            for p in range(position, position + self.batch_size):
                if p // self.n != epoch:
                    epoch = p // self.n
                    order = epoch_order(self.n, epoch, self.seed, self.shuffle).tolist()
                batch.append((order[p % self.n], sample_seed(self.seed, p), len(batch)))
            position += stride
            yield batch


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` in each worker from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def usable_workers(requested: int) -> int:
    """``requested`` loader processes, at most one per CPU this process may run on (what DataLoader
    warns beyond): a recipe's 4 on a 2-core machine is 2. The batches do not depend on the count
    (every sample is seeded by its stream position)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(requested, cpus))


def _data_loader(dataset: Dataset, batch_sampler: Sampler, num_workers: int, seed: int,
                 collate_fn: Callable | None) -> DataLoader:
    num_workers = usable_workers(num_workers)
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed & (_MASK64 >> 1)),
        persistent_workers=num_workers > 0,
    )


class InfiniteLoader:
    """Endless batches for iteration-based training. ``step`` counts the batches handed out so far;
    iterating starts at ``step`` (0, or ``start_step`` to resume), and the batches
    equal those an uninterrupted run yields at the same steps. Use ``next(loader)`` (one running
    iterator, kept inside) or ``for batch in loader`` (a fresh iterator from ``step``). Under torchrun
    (``rank``/``world``, default: this process's) each rank reads its rows of every global batch."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0,
                 seed: int = 0, start_step: int = 0, collate_fn: Callable | None = None,
                 rank: int | None = None, world: int | None = None):
        if len(dataset) == 0:
            raise ValueError("InfiniteLoader needs a non-empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.step = start_step
        self._iterator: Iterator | None = None
        info = dist.current()
        self._sampler = _StreamBatchSampler(len(dataset), batch_size, shuffle, seed, start_step,
                                            info.rank if rank is None else rank, info.world if world is None else world)
        self._loader = _data_loader(dataset, self._sampler, num_workers, seed, collate_fn)

    def __iter__(self) -> Iterator:
        self._sampler.start_step = self.step
        for batch in self._loader:
            self.step += 1
            yield batch

    def __next__(self):
        if self._iterator is None:
            self._iterator = iter(self)
        return next(self._iterator)
