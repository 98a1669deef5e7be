"""Replay buffer of latent chain states for persistent eps-space Langevin (Appendix E).

Only the latent noise eps_z is stored; eps_x always starts fresh from N(0, I) (the paper and the
published code). Storage is one preallocated tensor per latent group, ``(capacity, C_l, H_l,
W_l)``, on the chains' device, written as a ring: the newest ``capacity`` chain ends survive.
Each iteration every chain independently starts from a random stored state with probability
p(it) = buffer_prob * min(1, it / ramp) (0 -> 0.6 over 5,000 iterations in the paper, 3,000
for CelebA HQ) and from fresh noise otherwise. The replay decisions and picks come from the
buffer's own seeded generator, saved by :meth:`state_dict`, so a resumed run replays the same
states.

Under data-parallel training each rank keeps its own buffer of ``capacity // world_size`` rows
(the memory the single-process buffer would have, split), fed only by its own chains and seeded
with ``seed + rank``: the union over ranks plays the role of the single buffer, but replay picks
differ from a one-process run once the buffer is in use.

The published code keeps a Python list of CPU tensors (5 to 14 GB of host RAM) that is never
checkpointed; here the buffer lives on the device and goes into checkpoints (filled rows only).
Memory: capacity x sum_l C_l H_l W_l x 4 bytes (CIFAR-10's NVAE: 10,000 x 153,600 floats =
6.1 GB in float32; ``dtype=torch.bfloat16`` halves it).
"""

from __future__ import annotations

from typing import Sequence

import torch


class ReplayBuffer:
    """Ring buffer of eps_z.

    Args:
      shapes: per-sample shapes of the latent groups,
        e.g. ``[s[1:] for s in vae.eps_shapes(1)[:-1]]``.
      capacity: rows kept (10,000; 8,000 CelebA HQ).
      prob: final replay probability (0.6). ramp: iterations to reach it linearly (5,000).
      seed: seed of the replay decisions. device, dtype: of the storage.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], capacity: int, *, prob: float = 0.6,
                 ramp: int = 5000, seed: int = 0, device=None, dtype=torch.float32):
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if int(ramp) != ramp or ramp < 0:
            raise ValueError(f"ramp must be a non-negative integer, got {ramp}")
        shapes = [tuple(int(d) for d in s) for s in shapes]
        if not shapes:
            raise ValueError("shapes is empty: the buffer stores at least one latent group")
        self.shapes, self.capacity = shapes, int(capacity)
        self.prob, self.ramp, self.seed = float(prob), int(ramp), int(seed)
        self.storage = [torch.zeros((self.capacity,) + s, device=device, dtype=dtype)
                        for s in shapes]
        self.ptr = 0   # next row to write
        self.size = 0  # rows filled
        self.gen = torch.Generator().manual_seed(self.seed)  # CPU: decisions are B numbers

    def __len__(self) -> int:
        return self.size

    def probability(self, iteration: int) -> float:
        """p(it) = prob * min(1, it / ramp); ``prob`` at once when ramp is 0."""
        if self.ramp == 0:
            return self.prob
        return self.prob * min(1.0, max(0, iteration) / self.ramp)

    def _check(self, eps_z: Sequence[torch.Tensor]) -> int:
        if len(eps_z) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} latent groups, got {len(eps_z)}")
        b = eps_z[0].shape[0]
        for k, (e, s) in enumerate(zip(eps_z, self.shapes)):
            if tuple(e.shape[1:]) != s or e.shape[0] != b:
                raise ValueError(f"latent group {k}: expected shape (B, {', '.join(map(str, s))})"
                                 f" with B={b}, got {tuple(e.shape)}")
        return b

    @torch.no_grad()
    def sample(self, fresh: Sequence[torch.Tensor], iteration: int):
        """Chain starts: row i is a stored state with probability p(iteration), else
        ``fresh[.][i]``. ``fresh``: list of (B, *shape) (not modified). Returns (list of new
        tensors like ``fresh``, (B,) bool mask of replayed rows, on the CPU)."""
        b = self._check(fresh)
        u = torch.rand(b, generator=self.gen)
        idx = torch.randint(0, max(self.size, 1), (b,), generator=self.gen)
        if self.size > 0:
            replay = u < self.probability(iteration)
        else:
            replay = torch.zeros(b, dtype=torch.bool)
        out = [f.clone() for f in fresh]
        rows = replay.nonzero().squeeze(1)
        if rows.numel():
            dev = fresh[0].device
            r, i = rows.to(dev), idx[rows].to(self.storage[0].device)
            for o, s in zip(out, self.storage):
                o[r] = s[i].to(device=dev, dtype=o.dtype)
        return out, replay

    @torch.no_grad()
    def push(self, eps_z: Sequence[torch.Tensor]) -> None:
        """Store the chains' final eps_z (list of (B, *shape)); the oldest rows are overwritten."""
        b = self._check(eps_z)
        if b == 0:
            return
        if b > self.capacity:  # only the last `capacity` rows would survive anyway
            eps_z = [e[-self.capacity:] for e in eps_z]
            b = self.capacity
        dev = self.storage[0].device
        rows = (torch.arange(b) + self.ptr) % self.capacity
        rows = rows.to(dev)
        for s, e in zip(self.storage, eps_z):
            s.index_copy_(0, rows, e.detach().to(device=dev, dtype=s.dtype))
        self.ptr = (self.ptr + b) % self.capacity
        self.size = min(self.capacity, self.size + b)

    def state_dict(self) -> dict:
        """Filled rows (in ring order as stored), pointer, settings and the generator state."""
        return {"shapes": [list(s) for s in self.shapes], "capacity": self.capacity,
                "prob": self.prob, "ramp": self.ramp, "seed": self.seed, "ptr": self.ptr,
                "size": self.size, "gen": self.gen.get_state(),
                "storage": [s[:self.size].detach().clone() for s in self.storage]}

    def load_state_dict(self, sd: dict) -> None:
        shapes = [tuple(s) for s in sd["shapes"]]
        if shapes != self.shapes or int(sd["capacity"]) != self.capacity:
            raise ValueError(f"buffer state is for shapes {shapes} x capacity {sd['capacity']}, "
                             f"this buffer has {self.shapes} x {self.capacity}")
        size = int(sd["size"])
        for s, v in zip(self.storage, sd["storage"]):
            if v.shape[0] != size:
                raise ValueError(f"buffer state holds {v.shape[0]} rows, its size says {size}")
            s.zero_()
            s[:size].copy_(v.to(device=s.device, dtype=s.dtype))
        self.size, self.ptr = size, int(sd["ptr"])
        self.prob, self.ramp, self.seed = float(sd["prob"]), int(sd["ramp"]), int(sd["seed"])
        self.gen.set_state(sd["gen"])
