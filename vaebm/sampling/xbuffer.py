"""A sample bank (replay buffer) of x-space chain states for persistent Langevin training.

The pattern of IGEBM (Du & Mordatch, 2019) and JEM (Grathwohl et al., 2020): a bank of
``size`` states, initialised from noise; each training iteration draws a batch of bank rows,
restarts a ``reinit_prob`` fraction of them from fresh noise, runs a few Langevin steps and
writes the chains' ends back to the rows they came from::

    bank = SampleBank(10_000, (3, 32, 32), init="uniform", reinit_prob=0.05, seed=0)
    sampler = None
    for it in range(n_iters):
        x, idx = bank.sample(64)
        if sampler is None:
            sampler = FusedLangevin.from_sgld(x, 1.0, 0.01, chain_ids=idx, seed=0)
        else:
            sampler.bind(x, chain_ids=idx)  # same seed, the global step carries on
        for _ in range(20):
            sampler.step(energy)
        bank.update(idx, x)

``sample`` returns the bank indices of its rows; as ``chain_ids`` they key each chain's Philox
noise, so a bank row gets the same noise whatever batch position it is drawn at, and the
sampler's global step (which :meth:`FusedLangevin.bind` keeps) makes every iteration's noise
new. Rows are drawn without replacement, so a batch never holds one bank row twice (two rows
with one chain id would get identical noise).

Every random choice (the rows, the restarts, the fresh noise) comes from the bank's own seeded
CPU generator, saved by :meth:`state_dict`, so a resumed run draws what the uninterrupted run
would have, on any device. Memory: ``size x prod(shape)`` elements of ``dtype`` on ``device``.

This is the x-space companion of :class:`vaebm.sampling.buffer.ReplayBuffer` (VAEBM's latent
eps buffer, which ramps a replay probability instead).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

__all__ = ["SampleBank"]

InitFn = Callable[[int, torch.Generator], torch.Tensor]


class SampleBank:
    """Bank of ``size`` x-space states of shape ``shape`` (per sample).

    Args:
      size: number of rows (IGEBM / JEM: 10,000).
      shape: per-sample shape, e.g. ``(3, 32, 32)``.
      init: where fresh states come from: ``"uniform"`` (U(low, high) with ``init_range``,
        U(-1, 1) by default as JEM), ``"normal"`` (N(0, I)), or a callable
        ``init(n, generator) -> (n, *shape)`` tensor that draws from the given CPU generator
        (so the bank's seed decides it).
      reinit_prob: probability that a drawn row restarts from ``init`` (IGEBM / JEM: 0.05).
      seed: seed of the bank's generator (its initial content, the draws and the restarts).
      device, dtype: of the bank's storage and of the batches it returns.
      init_range: (low, high) of ``init="uniform"``; IGEBM's images in [0, 1] use (0, 1).
    """

    def __init__(self, size: int, shape: Sequence[int] | int, *,
                 init: Union[str, InitFn] = "uniform", reinit_prob: float = 0.05,
                 seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                 init_range: tuple[float, float] = (-1.0, 1.0)):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(isinstance(d, bool) or int(d) != d or d < 1 for d in shape):
            raise ValueError(f"shape must hold positive integers (the per-sample shape, without "
                             f"the batch), got {shape}")
        if not (isinstance(reinit_prob, (int, float)) and 0.0 <= reinit_prob <= 1.0):
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob!r}")
        if isinstance(init, str):
            if init not in ("uniform", "normal"):
                raise ValueError(f"init must be 'uniform', 'normal' or a callable "
                                 f"init(n, generator), got {init!r}")
        elif not callable(init):
            raise TypeError(f"init must be 'uniform', 'normal' or a callable, got "
                            f"{type(init).__name__}")
        lo, hi = (float(v) for v in init_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"init_range must be finite (low, high) with low < high, got "
                             f"{init_range}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be floating point, got {dtype}")
        self.size, self.shape = int(size), tuple(int(d) for d in shape)
        self.init, self.init_range = init, (lo, hi)
        self.reinit_prob, self.seed = float(reinit_prob), int(seed)
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(self.seed)
        self.bank = self._fresh(self.size).to(device=device)
        self.last_reinit: torch.Tensor | None = None  # (batch,) bool of the last sample()

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        return self.bank.device

    # ------------------------------------------------------------------------------ draws
    def _fresh(self, n: int) -> torch.Tensor:
        """``n`` fresh states from ``init`` (drawn on the CPU from the bank's generator)."""
        if self.init == "uniform":
            lo, hi = self.init_range
            x = torch.rand((n,) + self.shape, generator=self.gen) * (hi - lo) + lo
        elif self.init == "normal":
            x = torch.randn((n,) + self.shape, generator=self.gen)
        else:
            x = self.init(n, self.gen)
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (n,) + self.shape:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"init(n, generator) must return a tensor of shape "
                                 f"{(n,) + self.shape}, got {got}")
        return x.to(dtype=self.dtype)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch`` distinct bank rows: returns ``(x, idx)``, ``x`` a new (batch, *shape)
        tensor (a copy: the bank is untouched until :meth:`update`) and ``idx`` (batch,) int64
        the rows' bank indices (on the bank's device; pass them as ``chain_ids`` and to
        :meth:`update`). Each row independently restarts from ``init`` with probability
        ``reinit_prob``; ``self.last_reinit`` (batch,) bool says which did."""
        if isinstance(batch, bool) or int(batch) != batch or not 1 <= batch <= self.size:
            raise ValueError(f"batch must be an integer in [1, {self.size}] (the bank's size; "
                             f"rows are drawn without replacement), got {batch!r}")
        batch = int(batch)
        idx = torch.randperm(self.size, generator=self.gen)[:batch]
        reinit = torch.rand(batch, generator=self.gen) < self.reinit_prob
        x = self.bank[idx.to(self.device)]  # advanced indexing: a copy
        n = int(reinit.sum())
        if n:
            x[reinit.to(self.device)] = self._fresh(n).to(self.device)
        self.last_reinit = reinit
        return x, idx.to(self.device)

    def update(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        """Write the states ``x`` (batch, *shape) back to bank rows ``idx`` (batch,)."""
        idx = torch.as_tensor(idx)
        if idx.ndim != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"idx must be a 1-D integer tensor of bank indices, got "
                             f"{idx.dtype} {tuple(idx.shape)}")
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (idx.shape[0],) + self.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape {(idx.shape[0],) + self.shape} (one state per "
                             f"index), got {got}")
        if idx.numel() == 0:
            return
        idx = idx.to(device=self.device, dtype=torch.int64)
        if bool((idx < 0).any()) or bool((idx >= self.size).any()):
            raise IndexError(f"idx must lie in [0, {self.size}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        if idx.unique().numel() != idx.numel():
            raise ValueError("idx holds a bank row more than once: which write wins would be "
                             "undefined")
        self.bank.index_copy_(0, idx, x.detach().to(device=self.device, dtype=self.dtype))

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The bank's content and its generator's state (a resumed run draws the same rows)."""
        return {"bank": self.bank.detach().cpu().clone(), "generator": self.gen.get_state()}

    def load_state_dict(self, d: dict) -> None:
        """Restore :meth:`state_dict`; the stored bank must have this bank's size and shape."""
        bank = d["bank"]
        want = (self.size,) + self.shape
        if tuple(bank.shape) != want:
            raise ValueError(f"stored bank has shape {tuple(bank.shape)}, this bank is {want}")
        self.bank.copy_(bank.to(device=self.device, dtype=self.dtype))
        self.gen.set_state(d["generator"])

    def __repr__(self) -> str:
        return (f"SampleBank(size={self.size}, shape={self.shape}, init={self.init!r}, "
                f"reinit_prob={self.reinit_prob}, device={self.device}, dtype={self.dtype})")
