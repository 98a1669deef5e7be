"""Data-parallel training for both stages, one process per device (``torchrun``).

Usage: call :func:`init_distributed` first thing in the script torchrun starts
(``torchrun --nproc_per_node 8 script.py``), then build the models and call ``train_vae`` /
``train_ebm`` with the GLOBAL batch size; they pick up the rank and world size themselves.

``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and starts a process group: NCCL on GPUs, gloo on CPUs. Without WORLD_SIZE > 1 it
is a no-op and everything below degrades to a single process.

Gradients are averaged over ranks by one coalesced all-reduce after ``backward`` (as NVAE's own
trainer does), not by wrapping models in ``DistributedDataParallel``: the stage-1 loss comes from
``vae.loss_terms`` and ``vae.regularizers``, the stage-2 loss from two energy evaluations plus a
spectral term, none of which is a single ``forward`` call, which DDP's reducer assumes.

Data: the global batch of iteration ``it`` is the same set of indices whatever the world size
(a seeded permutation per epoch); rank r takes the contiguous slice ``[r*B, (r+1)*B)``. So an
N-rank run sees exactly the batches of a one-process run with the same global batch, which
``DistributedSampler``'s strided split does not give. Resuming at iteration ``it`` skips to the
right batch without reading the skipped ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, TensorDataset


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Start the process group from torchrun's environment (no-op for a single process).
    Picks ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU; backend NCCL on CUDA, gloo else."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if ws > 1 and not is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=ws)
    if is_initialized():
        rank, ws = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, ws, local, dev)


def shutdown_distributed() -> None:
    """Destroy the process group (end of a torchrun script)."""
    if is_initialized():
        dist.destroy_process_group()


def default_device(module: torch.nn.Module, requested=None) -> torch.device:
    """``requested`` if given; under an NCCL process group this rank's current CUDA device;
    else where ``module``'s parameters live."""
    if requested is not None:
        return torch.device(requested)
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return next(module.parameters()).device


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def average_gradients(params) -> None:
    """p.grad <- mean over ranks, one all-reduce per dtype/device (params without grad skip,
    identically on every rank since all ranks build the same graph)."""
    if not is_initialized():
        return
    ws = dist.get_world_size()
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= ws
        i = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[i:i + n].view_as(g))
            i += n


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Parameters and buffers of rank ``src`` on every rank (same start everywhere)."""
    if not is_initialized():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Floating-point buffers (BatchNorm running statistics) averaged over ranks, so the state
    rank 0 checkpoints reflects every rank's data."""
    if not is_initialized():
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= dist.get_world_size()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (for logged statistics)."""
    if not is_initialized():
        return values
    v = values.detach().clone()
    dist.all_reduce(v)
    return v / dist.get_world_size()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks roll back together)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------- data
def as_dataset(data) -> Dataset:
    """A Dataset from a Dataset, a (N, C, H, W) tensor or a tuple of tensors."""
    if isinstance(data, torch.Tensor):
        return TensorDataset(data)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return data
    raise TypeError(f"data must be a Dataset (with __getitem__ and __len__), a tensor, or a "
                    f"callable it -> batch; got {type(data).__name__}")


def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate(items):
    xs = [_first(it) for it in items]
    if not all(isinstance(x, torch.Tensor) for x in xs):
        raise TypeError("dataset items must be tensors or (tensor, label) pairs")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise ValueError(f"dataset items have different shapes {sorted(shapes)}")
    return torch.stack(xs)


class BatchStream:
    """Global batches of a map-style dataset, sharded over ranks, resumable at any iteration.

    Iteration ``it`` is batch ``it % per_epoch`` of epoch ``it // per_epoch``; epoch e's order is
    ``randperm(N)`` from a generator seeded with ``seed + e`` (the last partial batch dropped).
    Rank r of ``world`` gets rows ``[r*B, (r+1)*B)`` of the global batch, B = batch / world.
    """

    def __init__(self, data, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 num_workers: int = 0, shuffle: bool = True, pin_memory: bool = False):
        self.dataset = as_dataset(data)
        self.n = len(self.dataset)
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} is not divisible by {world} ranks")
        if self.n < batch_size:
            raise ValueError(f"the dataset has {self.n} items, fewer than one global batch "
                             f"of {batch_size}")
        self.batch, self.local = int(batch_size), int(batch_size) // world
        self.seed, self.rank, self.world = int(seed), rank, world
        self.num_workers, self.shuffle, self.pin_memory = num_workers, shuffle, pin_memory
        self.per_epoch = self.n // self.batch

    def indices(self, epoch: int) -> list[list[int]]:
        """This rank's index lists for every batch of ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        out = []
        for b in range(self.per_epoch):
            lo = b * self.batch + self.rank * self.local
            out.append(perm[lo:lo + self.local].tolist())
        return out

    def iterate(self, start: int = 0):
        """Yield (it, batch) for it = start, start + 1, ... forever."""
        it = start
        while True:
            epoch, b0 = divmod(it, self.per_epoch)
            sampler = self.indices(epoch)[b0:]
            # own generator: a DataLoader iterator otherwise draws its worker seed from the
            # global RNG, and a resumed run would create it at a different point of the stream
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_collate,
                                num_workers=self.num_workers, generator=g,
                                pin_memory=self.pin_memory)
            for x in loader:
                yield it, x
                it += 1

    INIT_EPOCH = 2**31  # an order of its own for data-dependent init

    def first_batches(self, n: int) -> list[torch.Tensor]:
        """``n`` of this rank's batches from an order of their own (data-dependent init)."""
        idx = self.indices(self.INIT_EPOCH)
        return [_collate([self.dataset[i] for i in ix]) for ix in idx[:n]]


def cpu_threads_per_rank(world: int) -> int:
    """Threads per process when ``world`` CPU processes share this machine."""
    return max(1, (os.cpu_count() or 1) // max(1, world))
