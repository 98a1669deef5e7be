"""The pieces of FusedLangevin that are not the unadjusted step: the Metropolis-adjusted step
(MALA), CUDA-graph capture, and the record of a bound sampler's resolved kernels. ``self`` is
the sampler (vaebm.sampling.langevin.FusedLangevin); MALA's update, reductions and accept
uniforms go to the kernels it resolved when it bound its state (``self._kernels``), else to
the validating front-ends."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..ops.philox import STREAM_ACCEPT, philox_uniform


class _Kernels(NamedTuple):
    """A bound sampler's resolved kernels and their constant arguments (see _make_kernels)."""
    update: Callable
    reduce: Callable
    seed_lo: int
    seed_hi: int
    sample_offset: int  # (mod 2**32)
    lam: float
    clip_value: float  # 0: none
    lo: float
    hi: float
    uniform: Callable | None  # MALA's accept uniforms (cpp), else the reference
    backend: str


def mala_step(self, energy_fn):
    """One Metropolis-adjusted step (MALA): propose with the fused update from the cached
    energy and gradient of the state, accept per chain against Philox uniforms (stream
    ``STREAM_ACCEPT``), keep the cache of the accepted point. Returns the energies."""
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
    k = self._kernels
    if k is not None and k.uniform is not None:
        u = k.uniform(self._samples, self.step_t, k.seed_lo, k.seed_hi, STREAM_ACCEPT)
    else:
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


def capture(self, energy_fn, warmup):
    """Record one step into a CUDA graph (after ``warmup`` eager steps on a side stream), then
    undo the warm-up's effect on the chains, the counters and the statistics."""
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
