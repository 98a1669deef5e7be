"""On-device chain diagnostics, written without host synchronisation inside the step loop.

Traces are ring buffers of ``capacity`` rows indexed by the device step counter, so the same code
records eagerly and inside a replayed CUDA graph. Reading them (``summary``) synchronises; do it
after the loop.
"""

from __future__ import annotations

import weakref

import torch

# One spare CPU statistics block, handed from a LangevinStats that is gone to the next one made:
# samplers are often made afresh for every batch of chains (a training iteration's short runs),
# and a new block's pages fault in as the kernel writes its rows (8 pages a step for 2000
# chains: half of the statistics' cost). CUDA's caching allocator does this by itself.
_SPARE_MAX_BYTES = 16 << 20
_spare: list[torch.Tensor] = []


def _take_spare(numel: int, device) -> torch.Tensor | None:
    if _spare and torch.device(device).type == "cpu" and _spare[0].numel() >= numel:
        return _spare.pop()
    return None


def _give_spare(holder: list) -> None:
    t = holder[0] if holder else None
    if t is None or t.device.type != "cpu" or t.numel() * 4 > _SPARE_MAX_BYTES:
        return
    if not _spare or _spare[0].numel() < t.numel():
        _spare[:] = [t]


class LangevinStats:
    """Per-step, per-chain traces of a Langevin run.

    Attributes (tensors on the chains' device, rows = the last ``min(steps, capacity)`` steps):
      ``energy``  (T, B) energy of the state each step started from (NaN where non-finite);
      ``grad_norm`` (T, B) norm of the (value-clipped) energy gradient;
      ``accepted`` (T, B) MALA accept decisions (all True without MALA, False where guarded);
      ``guarded`` (T, B) chains rejected or reset by the non-finite guard.

    Memory is bounded by ``capacity`` rows whatever the number of steps, and grows to it by
    doubling from ``initial`` rows, so a short run on many chains does not pay for 1024 rows
    (``initial=capacity`` preallocates, as a CUDA graph needs). Global step ``t`` is written at
    row ``t % rows``; ``t0`` is the global step of the first record.
    """

    def __init__(self, batch: int, device, capacity: int = 1024, *, initial: int | None = 16,
                 t0: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self._steps, self.t0 = int(capacity), 0, int(t0)
        self._sync = None  # set by a sampler whose compiled steps leave ``steps`` behind
        self.batch, self.device = int(batch), device
        self.n_guarded = torch.zeros((), dtype=torch.int64, device=device)
        self._holder = [None]  # the flat block under _buf, handed on when this object is gone
        weakref.finalize(self, _give_spare, self._holder)
        self._alloc(min(self.capacity, max(1, int(initial or self.capacity))))

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        if self._sync is not None:
            self._sync()
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = int(value)

    def _alloc(self, rows: int) -> None:
        # one float32 block (rows, 4, B): energy, grad norm, accepted, guarded (0/1), so the
        # kernel takes one statistics argument; only recorded rows are ever read (``_rows``,
        # ``state_dict``), so the block is left uninitialised: a zero fill touched every page
        # up front and made statistics cost 35 us a step over a 100-step run of 2000 chains
        n = rows * 4 * self.batch
        base = _take_spare(n, self.device)
        if base is None:
            base = torch.empty(n, dtype=torch.float32, device=self.device)
        self._holder[0] = base
        self._buf = base[:n].view(rows, 4, self.batch)

    @property
    def rows(self) -> int:
        """Rows allocated now (<= capacity)."""
        return self._buf.shape[0]

    def full(self) -> bool:
        """True when the next record would overwrite a row although more may be allocated."""
        return self.steps >= self.rows and self.rows < self.capacity

    def grow(self) -> None:
        """Double the rows (up to capacity), moving each record to its row under the new size."""
        old = self.rows
        new = min(self.capacity, 2 * old)
        if new == old:
            return
        n = min(self.steps, old)
        glob = torch.arange(self.t0 + self.steps - n, self.t0 + self.steps, device=self.device)
        src, src_holder = self._buf, [self._holder[0]]
        self._alloc(new)
        self._buf[glob % new] = src[glob % old]
        _give_spare(src_holder)

    def record(self, step_t: torch.Tensor, energy, gnorm, accepted, guarded) -> None:
        """Write one step's row at ``step_t % rows`` (a device index: no sync)."""
        if self.full():
            self.grow()
        row = step_t.remainder(self.rows)
        vals = torch.stack([v.to(torch.float32) for v in (energy, gnorm, accepted, guarded)])
        self._buf.index_copy_(0, row, vals.unsqueeze(0))
        self.n_guarded += guarded.sum()
        self.steps += 1

    def _recorded(self) -> torch.Tensor:
        """Buffer rows that hold records, oldest first."""
        n = min(self.steps, self.rows)
        glob = torch.arange(self.t0 + self.steps - n, self.t0 + self.steps, device=self.device)
        return glob % self.rows

    def _rows(self, buf):
        return buf[self._recorded()]

    def buffer(self) -> torch.Tensor:
        """A copy of the whole ring buffer with the rows that hold no record zeroed (what a
        checkpoint stores: the rows are where the next records expect them)."""
        out = torch.zeros_like(self._buf)
        idx = self._recorded()
        out[idx] = self._buf[idx]
        return out

    energy = property(lambda self: self._rows(self._buf[:, 0]))
    grad_norm = property(lambda self: self._rows(self._buf[:, 1]))
    accepted = property(lambda self: self._rows(self._buf[:, 2]) > 0.5)
    guarded = property(lambda self: self._rows(self._buf[:, 3]) > 0.5)

    @property
    def acceptance_rate(self) -> torch.Tensor:
        """Fraction of accepted moves over the recorded steps and chains (a device scalar)."""
        return self.accepted.float().mean()

    def summary(self) -> dict:
        """Python numbers for logging (synchronises with the device)."""
        e, g = self.energy, self.grad_norm
        fin = torch.isfinite(e)
        return {
            "steps": self.steps,
            "energy_first": e[0][fin[0]].mean().item() if self.steps else float("nan"),
            "energy_last": e[-1][fin[-1]].mean().item() if self.steps else float("nan"),
            "grad_norm_mean": g[torch.isfinite(g)].mean().item() if self.steps else float("nan"),
            "acceptance_rate": self.acceptance_rate.item() if self.steps else float("nan"),
            "guarded": int(self.n_guarded.item()),
        }
