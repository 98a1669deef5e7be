"""FusedLangevin: a drop-in Langevin sampler for any energy-based model.

Each step (paper Eq. 2; with ``lam = 1`` the eps-space chain of Eq. 9)::

    x <- x - (eta/2) * (grad E(x) + lam * x) + sigma * sqrt(eta) * xi,   xi ~ N(0, I)

updates every tensor of the state in one fused launch, with Philox noise keyed by (seed, step,
sample, element): a chain is the same whatever batch it runs in. Optional per-sample gradient
clipping, state clamping, Metropolis adjustment (MALA), a per-chain non-finite guard, on-device
diagnostics and CUDA-graph capture.

Shapes: ``state`` is one tensor (B, ...) or a list of tensors (B, ...) sharing B.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..ops import MODE_KEEP, MODE_RESET, MODE_UPDATE, langevin_reduce, langevin_update_
from ..ops.langevin import check_state
from ..ops.philox import STREAM_ACCEPT, philox_uniform
from .diagnostics import LangevinStats

EnergyFn = Callable[..., torch.Tensor]


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


class FusedLangevin:
    """Langevin sampler over a tensor or a list of state tensors, updated in place.

    Args:
      state: (B, ...) tensor or list of them; updated in place by :meth:`step`.
      step_size: eta > 0.
      lam: weight of the standard-normal base density (1 for VAEBM's eps-space, 0 for x-space).
      sigma: noise scale (1 is exact Langevin; smaller values as in IGEBM/JEM).
      clip_grad_norm: per-sample clipping of the energy gradient's norm over the whole state.
      clip_grad_value: per-element clipping of the energy gradient to +-value.
      clamp: (low, high) range the state is clamped to after each step (images).
      mala: Metropolis-adjusted Langevin (exact for target exp(-U / sigma^2), U = E + lam/2 |x|^2);
        one energy-and-gradient evaluation per step (the gradient at the state is cached).
      on_nonfinite: "reject" keeps a chain whose energy, gradient or state is NaN/Inf at its last
        state for that step; "reset" restarts it from N(0, I). Either way it is counted in
        ``stats.guarded`` and never touches other chains. ``None`` disables the guard.
      seed: Philox seed (drawn from torch's generator when None). sample_offset: global index of
        row 0, so a sub-batch reproduces the same chains as the full batch.
      backend: "auto", "torch", "cpp", "triton" or "cuda" (see :mod:`vaebm.ops`).
      capturable: keep all step bookkeeping on the device so :meth:`graph_step` can replay the whole
        step (energy forward, input gradient, update) as a CUDA graph.
      track: record :class:`LangevinStats` (ring buffers of ``max_steps`` rows).
    """

    def __init__(self, state, step_size: float, *, lam: float = 0.0, sigma: float = 1.0,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 clamp: tuple[float, float] | None = None, mala: bool = False,
                 on_nonfinite: str | None = "reject", seed: int | None = None,
                 sample_offset: int = 0, backend: str | None = None, capturable: bool = False,
                 track: bool = True, max_steps: int = 1024):
        self.single = isinstance(state, torch.Tensor)
        self.state: list[torch.Tensor] = [state] if self.single else list(state)
        if not self.state:
            raise ValueError("state is empty: pass a tensor or a non-empty list of tensors")
        check_state(self.state)
        eta = float(step_size)
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"step_size must be positive and finite, got {step_size}")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be non-negative and finite, got {sigma}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {clip_grad_norm}")
        if on_nonfinite not in ("reject", "reset", None):
            raise ValueError(f"on_nonfinite must be 'reject', 'reset' or None, got {on_nonfinite!r}")
        if mala and clamp is not None:
            raise ValueError("mala=True with clamp: a clamped proposal has no Gaussian density, "
                             "so the Metropolis ratio would be wrong; drop one of them")
        if mala and not sigma > 0:
            raise ValueError("mala=True needs sigma > 0")
        dev = self.state[0].device
        if capturable and dev.type != "cuda":
            raise ValueError(f"capturable=True needs CUDA tensors, the state is on {dev}")
        self.step_size, self.lam, self.sigma = eta, float(lam), float(sigma)
        self.clip_grad_norm, self.clip_grad_value, self.clamp = clip_grad_norm, clip_grad_value, clamp
        self.mala, self.on_nonfinite, self.backend = bool(mala), on_nonfinite, backend
        self.seed = _draw_seed() if seed is None else int(seed)
        self.sample_offset, self.capturable = int(sample_offset), bool(capturable)
        self.batch = self.state[0].shape[0]
        self.t = 0  # host copy of the step counter
        self.step_t = torch.zeros(1, dtype=torch.int64, device=dev)
        self._samples = torch.arange(self.sample_offset, self.sample_offset + self.batch, device=dev)
        self.stats = LangevinStats(self.batch, dev, max_steps) if track else None
        self._cache = None  # MALA: (energy, grads, reduction) at the current state
        self._proposal = None
        self._graph = None

    # ----------------------------------------------------------------------------- energy
    def _energy_grad(self, energy_fn: EnergyFn, states: Sequence[torch.Tensor]):
        xs = [s.detach().requires_grad_(True) for s in states]
        with torch.enable_grad():
            energy = energy_fn(xs[0] if self.single else xs)
            energy = self._check_energy(energy)
            grads = torch.autograd.grad(energy.sum(), xs, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
        return energy.detach().float(), grads

    def _check_energy(self, energy) -> torch.Tensor:
        if not isinstance(energy, torch.Tensor):
            raise TypeError(f"energy_fn must return a tensor, got {type(energy).__name__}")
        if energy.shape == (self.batch, 1):
            energy = energy.squeeze(1)
        if energy.shape != (self.batch,):
            raise ValueError(f"energy_fn must return one energy per sample, shape ({self.batch},), "
                             f"got {tuple(energy.shape)}")
        if not energy.requires_grad:
            raise ValueError("energy_fn's output does not depend on the state (no gradient); "
                             "was it computed under torch.no_grad() or detached?")
        return energy

    # ----------------------------------------------------------------------------- pieces
    def _reduce(self, states, grads, others=None, gscale=None):
        return langevin_reduce(states, grads, others, step_size=self.step_size, lam=self.lam,
                               clip_value=self.clip_grad_value, gscale=gscale, backend=self.backend)

    def _gscale(self, red):
        if self.clip_grad_norm is None:
            return None
        return (self.clip_grad_norm / (red[:, 0].sqrt() + 1e-12)).clamp(max=1.0)

    def _bad(self, energy, red):
        return ~torch.isfinite(energy) | (red[:, 1] > 0)

    def _mode(self, bad):
        if self.on_nonfinite is None:
            return None
        fix = MODE_RESET if self.on_nonfinite == "reset" else MODE_KEEP
        return torch.where(bad, fix, MODE_UPDATE).to(torch.int32)

    def _update(self, grads, outs=None, gscale=None, mode=None):
        langevin_update_(self.state, grads, outs, seed=self.seed, step=self.step_t,
                         sample_offset=self.sample_offset, step_size=self.step_size, lam=self.lam,
                         sigma=self.sigma, clip_value=self.clip_grad_value, clamp=self.clamp,
                         gscale=gscale, mode=mode, backend=self.backend)

    def _record(self, energy, red, accepted, guarded):
        if self.stats is not None:
            e = torch.where(torch.isfinite(energy), energy, float("nan"))
            self.stats.record(self.step_t, e, red[:, 0].sqrt(), accepted, guarded)

    # ----------------------------------------------------------------------------- steps
    @torch.no_grad()
    def step_with_grad(self, grads, energy: torch.Tensor | None = None) -> None:
        """One unadjusted step from gradients computed by the caller (grads like the state).
        ``energy`` (B,), if given, takes part in the guard and the trace."""
        if self.mala:
            raise ValueError("MALA needs energies at proposals: use step(energy_fn)")
        grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
        if energy is None:
            energy = torch.zeros(self.batch, device=self.step_t.device)
        self._ula_update(energy.detach().float().reshape(self.batch), grads)

    def _ula_update(self, energy, grads):
        need = (self.on_nonfinite is not None or self.clip_grad_norm is not None
                or self.stats is not None)
        red = self._reduce(self.state, grads) if need else None
        bad = self._bad(energy, red) if red is not None else None
        mode = self._mode(bad) if bad is not None else None
        self._update(grads, gscale=self._gscale(red) if red is not None else None, mode=mode)
        if red is not None:
            guarded = bad if self.on_nonfinite is not None else torch.zeros_like(bad)
            self._record(energy, red, ~guarded, guarded)
        self._advance()

    def _advance(self):
        self.step_t += 1
        self.t += 1

    def step(self, energy_fn: EnergyFn) -> torch.Tensor:
        """One step. ``energy_fn(state)`` returns (B,) energies; only the state gets gradients.
        Returns the energies of the state the step started from (MALA: of the new state)."""
        if self._graph is not None:
            raise RuntimeError("this sampler was captured into a CUDA graph: use graph_step()")
        if self.mala:
            return self._mala_step(energy_fn)
        energy, grads = self._energy_grad(energy_fn, self.state)
        with torch.no_grad():
            self._ula_update(energy, grads)
        return energy

    @torch.no_grad()
    def _mala_step(self, energy_fn):
        if self._cache is None:
            e, g = self._energy_grad(energy_fn, self.state)
            self._cache = (e, g, self._reduce(self.state, g))
            self._proposal = [torch.empty_like(s) for s in self.state]
        e_x, g_x, red_x = self._cache
        bad_x = self._bad(e_x, red_x)
        s_x = self._gscale(red_x)
        mode = self._mode(bad_x)
        prop = self._proposal
        self._update(g_x, outs=prop, gscale=s_x, mode=mode)
        e_p, g_p = self._energy_grad(energy_fn, prop)
        s_p = self._gscale(self._reduce(prop, g_p)) if self.clip_grad_norm is not None else None
        red_p = self._reduce(prop, g_p, others=self.state, gscale=s_p)  # col 3: reverse move
        fwd = self._reduce(self.state, g_x, others=prop, gscale=s_x)[:, 3]
        u_x = e_x + 0.5 * self.lam * red_x[:, 2]
        u_p = e_p + 0.5 * self.lam * red_p[:, 2]
        s2 = self.sigma**2
        log_alpha = (u_x - u_p) / s2 + (fwd - red_p[:, 3]) / (2 * s2 * self.step_size)
        u = philox_uniform(self.seed, self.step_t, self._samples, STREAM_ACCEPT)
        bad_p = self._bad(e_p, red_p)
        accept = (torch.log(u) < log_alpha) & ~bad_p & ~bad_x
        if self.on_nonfinite == "reset":  # a restarted chain takes its fresh start unconditionally
            accept |= bad_x & ~bad_p
        guarded = bad_x | bad_p
        self._record(e_x, red_x, accept, guarded)
        # in place, so that a captured graph reads and writes the same buffers every replay
        for s, p, g, gp in zip(self.state, prop, g_x, g_p):
            a = accept.view((-1,) + (1,) * (s.ndim - 1))
            s.copy_(torch.where(a, p, s))
            g.copy_(torch.where(a, gp, g))
        e_x.copy_(torch.where(accept, e_p, e_x))
        red_x.copy_(torch.where(accept[:, None], red_p, red_x))
        self._advance()
        return e_x

    # ----------------------------------------------------------------------------- graphs
    def graph_step(self, energy_fn: EnergyFn, warmup: int = 2) -> None:
        """Like :meth:`step`, replayed as one CUDA graph (energy forward, input gradient, fused
        update). The first call captures (after ``warmup`` eager steps on a side stream whose
        effect on the chains is undone); ``energy_fn`` must be capture-safe and static-shaped."""
        if not self.capturable:
            raise RuntimeError("graph_step needs FusedLangevin(..., capturable=True)")
        if self._graph is None:
            self._capture(energy_fn, warmup)
        self._graph.replay()
        self.t += 1
        if self.stats is not None:
            self.stats.steps += 1

    def _capture(self, energy_fn, warmup):
        saved = [s.clone() for s in self.state]
        t, step_saved, stats_steps = self.t, self.step_t.clone(), self.stats and self.stats.steps
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self.step(energy_fn)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(energy_fn)
        for s, v in zip(self.state, saved):
            s.copy_(v)
        self.step_t.copy_(step_saved)
        self.t = t
        if self.mala:  # the cached energy and gradient must describe the restored state
            e, g = self._energy_grad(energy_fn, self.state)
            e_x, g_x, red_x = self._cache
            e_x.copy_(e)
            for a, b in zip(g_x, g):
                a.copy_(b)
            red_x.copy_(self._reduce(self.state, g))
        if self.stats is not None:
            self.stats.steps = stats_steps
            self.stats.n_guarded.zero_()
        self._graph = graph
