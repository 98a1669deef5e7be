"""On-device chain diagnostics, written without host synchronisation inside the step loop.

Traces are ring buffers of ``capacity`` rows indexed by the device step counter, so the same code
records eagerly and inside a replayed CUDA graph. Reading them (``summary``) synchronises; do it
after the loop.
"""

from __future__ import annotations

import torch


class LangevinStats:
    """Per-step, per-chain traces of a Langevin run.

    Attributes (tensors on the chains' device, rows = the last ``min(steps, capacity)`` steps):
      ``energy``  (T, B) energy of the state each step started from (NaN where non-finite);
      ``grad_norm`` (T, B) norm of the (value-clipped) energy gradient;
      ``accepted`` (T, B) MALA accept decisions (all True without MALA, False where guarded);
      ``guarded`` (T, B) chains rejected or reset by the non-finite guard.
    """

    def __init__(self, batch: int, device, capacity: int = 1024):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.steps = int(capacity), 0
        f = dict(device=device, dtype=torch.float32)
        self._energy = torch.full((capacity, batch), float("nan"), **f)
        self._gnorm = torch.full((capacity, batch), float("nan"), **f)
        self._acc = torch.zeros(capacity, batch, dtype=torch.bool, device=device)
        self._guard = torch.zeros(capacity, batch, dtype=torch.bool, device=device)
        self.n_guarded = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, step_t: torch.Tensor, energy, gnorm, accepted, guarded) -> None:
        """Write one step's row at ``step_t % capacity`` (a device index: no sync)."""
        row = step_t.remainder(self.capacity)
        for buf, val in ((self._energy, energy), (self._gnorm, gnorm), (self._acc, accepted),
                         (self._guard, guarded)):
            buf.index_copy_(0, row, val.to(buf.dtype).unsqueeze(0))
        self.n_guarded += guarded.sum()
        self.steps += 1

    def _rows(self, buf):
        n = min(self.steps, self.capacity)
        if self.steps <= self.capacity:
            return buf[:n]
        start = self.steps % self.capacity
        return torch.cat([buf[start:], buf[:start]])

    energy = property(lambda self: self._rows(self._energy))
    grad_norm = property(lambda self: self._rows(self._gnorm))
    accepted = property(lambda self: self._rows(self._acc))
    guarded = property(lambda self: self._rows(self._guard))

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
