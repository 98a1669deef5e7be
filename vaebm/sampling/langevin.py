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
from ..ops.langevin_ref import GUARD_KEEP, GUARD_NONE, GUARD_RESET
from ._differentiable import differentiable_step
from ._mala import _Kernels, capture, mala_step
from ._schedules import Schedule, _check_eta, _check_sigma, _schedule
from .diagnostics import LangevinStats

EnergyFn = Callable[..., torch.Tensor]


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


class FusedLangevin:
    """Langevin sampler over a tensor or a list of state tensors, updated in place.

    Args:
      state: (B, ...) tensor or list of them; updated in place by :meth:`step`.
      step_size: eta > 0; a float, or a schedule: a callable ``t -> eta`` of the global step
        ``t`` (see ``start_step``) or a sequence indexed by it.
      lam: weight of the standard-normal base density (1 for VAEBM's eps-space, 0 for x-space).
      sigma: noise scale (1 is exact Langevin; smaller values as in IGEBM/JEM); a float or a
        schedule like ``step_size`` (annealed noise).
      clip_grad_norm: per-sample clipping of the energy gradient's norm over the whole state.
      clip_grad_value: per-element clipping of the energy gradient to +-value.
      clamp: (low, high) range the state is clamped to after each step (images).
      mala: Metropolis-adjusted Langevin (exact for target exp(-U / sigma^2), U = E + lam/2 |x|^2);
        one energy-and-gradient evaluation per step (the gradient at the state is cached).
      on_nonfinite: "reject" keeps a chain whose energy, gradient or state is NaN/Inf at its last
        state for that step; "reset" restarts it from N(0, I). Either way it is counted in
        ``stats.guarded`` and never touches other chains. ``None`` disables the guard.
      seed: Philox seed (drawn from torch's generator when None).
      sample_offset: global index of row 0, so a sub-batch reproduces the same chains as the
        full batch. chain_ids: (B,) int64 ids keying each row's noise instead (e.g. the indices
        of the rows in a sample bank), so a chain's noise follows the chain, not its row.
      start_step: the global step the noise is keyed by at the first step; it advances by one
        per step and across :meth:`bind`, so a fixed seed never repeats an increment.
      backend: "auto", "torch", "cpp", "triton" or "cuda" (see :mod:`vaebm.ops`).
      capturable: keep all step bookkeeping on the device so :meth:`graph_step` can replay the whole
        step (energy forward, input gradient, update) as a CUDA graph.
      create_graph: differentiable chains (``torch`` backend only): gradients flow from the
        final state to the energy's parameters and the initial state (improved contrastive
        divergence); the state tensors are replaced, not updated in place (read ``.state``).
      track: record :class:`LangevinStats` (ring buffers of ``max_steps`` rows: memory is
        bounded whatever the number of steps).

    The work is planned once: validation, backend resolution and argument packing happen here
    and in :meth:`bind`; on the ``cpp`` backend an unadjusted step is one call into the kernel
    (reduction, guard, gradient-norm clipping, update, statistics and the step counter
    together). The update is ``x - (eta/2) (grad E + lam x) + sigma sqrt(eta) xi``; for code
    written as ``x - a grad + b xi`` use :meth:`from_sgld`.
    """

    def __init__(self, state, step_size: Schedule, *, lam: float = 0.0, sigma: Schedule = 1.0,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 clamp: tuple[float, float] | None = None, mala: bool = False,
                 on_nonfinite: str | None = "reject", seed: int | None = None,
                 sample_offset: int = 0, chain_ids: torch.Tensor | None = None,
                 start_step: int = 0, backend: str | None = None, capturable: bool = False,
                 create_graph: bool = False, track: bool = True, max_steps: int = 1024):
        self._eta, self._eta_at = _schedule(step_size, "step_size")
        self._sig, self._sig_at = _schedule(sigma, "sigma")
        if self._eta is not None:
            _check_eta(self._eta)
        if self._sig is not None:
            _check_sigma(self._sig)
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {clip_grad_norm}")
        if clip_grad_value is not None and not clip_grad_value > 0:
            raise ValueError(f"clip_grad_value must be positive, got {clip_grad_value}")
        if on_nonfinite not in ("reject", "reset", None):
            raise ValueError(f"on_nonfinite must be 'reject', 'reset' or None, got {on_nonfinite!r}")
        if mala and clamp is not None:
            raise ValueError("mala=True with clamp: a clamped proposal has no Gaussian density, "
                             "so the Metropolis ratio would be wrong; drop one of them")
        if mala and self._sig is not None and not self._sig > 0:
            raise ValueError("mala=True needs sigma > 0")
        if clamp is not None and not float(clamp[0]) < float(clamp[1]):
            raise ValueError(f"clamp must be (low, high) with low < high, got {clamp}")
        if int(start_step) != start_step or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step}")
        if create_graph and (mala or capturable):
            raise ValueError("create_graph=True runs unadjusted eager steps: not with mala or "
                             "capturable")
        self.lam = float(lam)
        self.clip_grad_norm, self.clip_grad_value, self.clamp = clip_grad_norm, clip_grad_value, clamp
        self.mala, self.on_nonfinite, self.backend = bool(mala), on_nonfinite, backend
        self.seed = _draw_seed() if seed is None else int(seed)
        self.capturable, self.create_graph = bool(capturable), bool(create_graph)
        self.track, self.max_steps = bool(track), int(max_steps)
        self._t = int(start_step)  # host copy of the step counter (the global step)
        self._host_stale = False  # compiled planned steps leave the host counters behind
        self._graph = None
        self.stats = None
        self.bind(state, sample_offset=sample_offset, chain_ids=chain_ids)

    @classmethod
    def from_sgld(cls, state, grad_scale: Schedule, noise_std: Schedule, **kwargs):
        """The sampler of code written as ``x <- x - grad_scale * grad E(x) + noise_std * xi``
        (IGEBM, JEM, short-run EBMs; JEM's ``f`` is ``E = -f``): ``step_size = 2 grad_scale``,
        ``sigma = noise_std / sqrt(2 grad_scale)``. Schedules (callables of the step, sequences)
        are mapped step by step. Other keyword arguments go to the constructor (``lam``
        defaults to 0: x-space)."""
        a_c, a_at = _schedule(grad_scale, "grad_scale")
        b_c, b_at = _schedule(noise_std, "noise_std")
        a = (lambda t: a_at(t)) if a_at else (lambda t: a_c)
        b = (lambda t: b_at(t)) if b_at else (lambda t: b_c)
        if a_at is None and b_at is None:
            if not (math.isfinite(a_c) and a_c > 0):
                raise ValueError(f"grad_scale must be positive and finite, got {grad_scale}")
            return cls(state, 2 * a_c, sigma=b_c / math.sqrt(2 * a_c), **kwargs)
        return cls(state, lambda t: 2 * a(t), sigma=lambda t: b(t) / math.sqrt(2 * a(t)), **kwargs)

    # ----------------------------------------------------------------------------- binding
    def bind(self, state, *, sample_offset: int = 0, chain_ids: torch.Tensor | None = None):
        """Point the sampler at new chains (e.g. a fresh draw from a sample bank), keeping its
        seed, its global step and its options; ``chain_ids`` key their noise (see the class).
        Statistics restart when the batch size changes."""
        if self._graph is not None:
            raise RuntimeError("this sampler was captured into a CUDA graph; build a new one")
        self.single = isinstance(state, torch.Tensor)
        states: list[torch.Tensor] = [state] if self.single else list(state)
        if not states:
            raise ValueError("state is empty: pass a tensor or a non-empty list of tensors")
        check_state(states)
        dev = states[0].device
        if self.capturable and dev.type != "cuda":
            raise ValueError(f"capturable=True needs CUDA tensors, the state is on {dev}")
        if self.create_graph and any(s.requires_grad and s.is_leaf for s in states):
            states = [s.clone() for s in states]  # leaves stay untouched; the graph starts here
        B = states[0].shape[0]
        if chain_ids is not None:
            chain_ids = torch.as_tensor(chain_ids)
            if chain_ids.shape != (B,) or chain_ids.is_floating_point() or chain_ids.is_complex():
                raise ValueError(f"chain_ids must be an integer tensor of shape ({B},), got "
                                 f"{chain_ids.dtype} {tuple(chain_ids.shape)}")
            if bool((chain_ids < 0).any()) or bool((chain_ids >= 2**32).any()):
                raise ValueError("chain_ids must lie in [0, 2**32) (they key 32-bit Philox counters)")
            chain_ids = chain_ids.to(device=dev, dtype=torch.int64).contiguous()
        self.state, self.batch = states, B
        self.sample_offset, self.chain_ids = int(sample_offset), chain_ids
        self.step_t = torch.full((1,), self.t, dtype=torch.int64, device=dev)
        self._samples = chain_ids if chain_ids is not None else \
            torch.arange(self.sample_offset, self.sample_offset + B, device=dev)
        if self.track and (self.stats is None or self.stats.batch != B
                           or self.stats.device != dev):
            # uninitialised rows cost nothing until written: up to 4 MiB before growing (a
            # 100-step run of 2000 chains never grows; each doubling copies the records)
            self.stats = LangevinStats(B, dev, self.max_steps, t0=self._t,
                                       initial=self.max_steps if self.capturable
                                       else max(16, (4 << 20) // (16 * B)))
        if self.stats is not None:
            self.stats._sync = self._sync_if_stale
        self._cache = None  # MALA: (energy, grads, reduction) at the current state
        # the energies' output gradient (see _ones_like); made here, not in a (compiled) step
        self._ones = torch.ones(self.batch, device=self.step_t.device)
        self._proposal = None
        self._kernels = self._make_kernels()
        self._plan = self._make_plan()
        return self

    def _make_kernels(self):
        """The resolved kernels and the step's constant arguments (:class:`_Kernels`): MALA and
        the ``cuda`` / ``triton`` steps call them directly (not the validating front-ends), and
        the one-call ``cpp`` plan is built from them. None where a front-end must adapt the
        call (a reference fallback, non-contiguous states, chain ids a kernel does not take)."""
        if self.create_graph:
            return None
        if not all(s.is_contiguous() for s in self.state):
            return None
        from ..ops import _registry
        from ..ops.langevin import REDUCE, UNIFORM, UPDATE
        x0 = self.state[0]
        name, upd = _registry.resolve_op(UPDATE, x0.device, x0.dtype, self.backend)
        uni = None  # MALA's accept uniforms: the cpp kernel, else the reference
        if self.mala and name in UNIFORM:
            uni = UNIFORM[name].get()
        _, red = _registry.resolve_op(REDUCE, x0.device, x0.dtype, self.backend)
        if upd is None or red is None:
            return None
        if self.chain_ids is not None and "chain_ids" not in UPDATE[name].features:
            return None
        lo, hi = (-math.inf, math.inf) if self.clamp is None else map(float, self.clamp)
        return _Kernels(upd, red, self.seed & 0xFFFFFFFF, self.seed >> 32,
                        self.sample_offset & 0xFFFFFFFF, float(self.lam),
                        float(self.clip_grad_value or 0.0), lo, hi, uni, name)

    def _make_plan(self):
        """The packed arguments of the one-call ``cpp`` step, or None where it does not apply
        (MALA, CUDA graphs, and wherever ``_make_kernels`` found no kernels: differentiable
        chains, other backends, non-contiguous states). Made after ``_make_kernels``."""
        from ..ops.langevin import STEP
        k = self._kernels
        if self.mala or self.capturable or k is None or k.backend not in STEP:
            return None
        op = STEP[k.backend].get()
        st = self.stats
        rec = (st._buf, st.n_guarded) if st is not None else (None, None)
        # the statistics grow when this many steps are recorded (a host int, read every step)
        self._grow_at = st.rows if st is not None and st.rows < st.capacity else math.inf
        # the state's autograd leaves, made once: views that see the kernel's in-place writes
        self._leaves = [s.detach().requires_grad_(True) for s in self.state]
        guard = {None: GUARD_NONE, "reject": GUARD_KEEP, "reset": GUARD_RESET}[self.on_nonfinite]
        return (op, k.seed_lo, k.seed_hi, k.sample_offset, self.chain_ids, k.lam, k.clip_value,
                float(self.clip_grad_norm or 0.0), k.lo, k.hi, guard, rec)

    # ----------------------------------------------------------------------------- counters
    @property
    def t(self) -> int:
        """The global step the next step's noise is keyed by (host copy of ``step_t``)."""
        if self._host_stale:
            self._sync_host()
        return self._t

    @t.setter
    def t(self, value: int) -> None:
        if self._host_stale:
            self._sync_host()
        self._t = int(value)

    def _sync_if_stale(self) -> None:
        if self._host_stale:
            self._sync_host()

    def _sync_host(self) -> None:
        """After planned steps run under torch.compile (which must not touch host ints, or every
        step would recompile): catch the host counters up with the device counter; each planned
        step recorded one statistics row."""
        self._host_stale = False
        n = int(self.step_t.reshape(-1)[0]) - self._t
        self._t += n
        if self.stats is not None:
            self.stats._steps += n

    # ----------------------------------------------------------------------------- schedules
    @property
    def step_size(self) -> float:
        """eta at the current global step."""
        return self._eta if self._eta_at is None else _check_eta(float(self._eta_at(self.t)))

    @property
    def sigma(self) -> float:
        """sigma at the current global step."""
        return self._sig if self._sig_at is None else _check_sigma(float(self._sig_at(self.t)))

    # ----------------------------------------------------------------------------- energy
    def _energy_grad(self, energy_fn: EnergyFn, states: Sequence[torch.Tensor]):
        xs = self._leaves if states is self.state and self._plan is not None else \
            [s.detach().requires_grad_(True) for s in states]
        if torch.is_grad_enabled():  # (the context manager costs as much as a small kernel)
            energy = self._check_energy(energy_fn(xs[0] if self.single else xs))
            grads = torch.autograd.grad(energy, xs, self._ones_like(energy), allow_unused=True)
        else:
            with torch.enable_grad():
                energy = self._check_energy(energy_fn(xs[0] if self.single else xs))
                grads = torch.autograd.grad(energy, xs, self._ones_like(energy),
                                            allow_unused=True)
        if any(g is None for g in grads):  # (not `None in grads`: Tensor == None costs 12 us)
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
        energy = energy.detach()
        return (energy if energy.dtype == torch.float32 else energy.float()), list(grads)

    def _ones_like(self, energy):
        """d(sum E)/dE, kept between steps: backpropagating it from E itself skips the sum and
        its backward node (two kernels a step) and gives the same gradients bit for bit."""
        ones = self._ones
        if ones.shape != energy.shape or ones.dtype != energy.dtype or ones.device != energy.device:
            ones = torch.ones_like(energy, memory_format=torch.contiguous_format)
            if not torch.compiler.is_compiling():  # (a new attribute would recompile)
                self._ones = ones
        return ones

    def _check_energy(self, energy) -> torch.Tensor:
        if not isinstance(energy, torch.Tensor):
            raise TypeError(f"energy_fn must return a tensor, got {type(energy).__name__}")
        if energy.shape != (self.batch,):
            if energy.ndim >= 1 and energy.shape[0] == self.batch and energy.numel() == self.batch:
                energy = energy.reshape(self.batch)  # (B, 1), (B, 1, 1, 1), ...
            else:
                raise ValueError(f"energy_fn must return one energy per sample, shape "
                                 f"({self.batch},) (or (B, 1, ...)), got {tuple(energy.shape)}")
        if not energy.requires_grad:
            raise ValueError("energy_fn's output does not depend on the state (no gradient); "
                             "was it computed under torch.no_grad() or detached?")
        return energy

    # ----------------------------------------------------------------------------- pieces
    def _reduce(self, states, grads, others=None, gscale=None):
        k = self._kernels
        if k is not None:
            return k.reduce(states, [g.contiguous() for g in grads], others, self.step_size / 2,
                            k.lam, k.clip_value, gscale)
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
        k = self._kernels
        if k is not None:
            eta = self.step_size
            k.update(self.state, [g.contiguous() for g in grads],
                     self.state if outs is None else outs, self.step_t, k.seed_lo, k.seed_hi,
                     k.sample_offset, eta / 2, self.sigma * math.sqrt(eta), k.lam, k.clip_value,
                     k.lo, k.hi, gscale, mode, self.chain_ids)
            return
        langevin_update_(self.state, grads, outs, seed=self.seed, step=self.step_t,
                         sample_offset=self.sample_offset, step_size=self.step_size, lam=self.lam,
                         sigma=self.sigma, clip_value=self.clip_grad_value, clamp=self.clamp,
                         gscale=gscale, mode=mode, chain_ids=self.chain_ids, backend=self.backend)

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
        energy = energy.detach().float().reshape(self.batch)
        if self._plan is not None:
            if len(grads) != len(self.state):
                raise ValueError(f"grads has {len(grads)} tensors but the state has "
                                 f"{len(self.state)}")
            for k, (g, x) in enumerate(zip(grads, self.state)):
                if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
                    raise ValueError(f"grads[{k}] is {tuple(g.shape)} {g.dtype} on {g.device}, "
                                     f"expected {tuple(x.shape)} {x.dtype} on {x.device} like "
                                     f"state[{k}]")
            self._planned(grads, energy)
        else:
            self._ula_update(energy, grads)

    def _planned(self, grads, energy):
        """The whole unadjusted step as one ``cpp`` call (spec: ops.langevin_ref.step_ref);
        the kernel also advances ``step_t``. ``grads`` are shaped like the state (autograd's,
        or checked by step_with_grad)."""
        compiling = torch.compiler.is_compiling()
        if not compiling and self._host_stale:  # before the kernel advances step_t again
            self._sync_host()
        # (host ints only: the statistics' properties cost microseconds a step)
        if not compiling and self.stats is not None and self.stats._steps >= self._grow_at:
            self.stats.grow()
            self._plan = self._make_plan()  # the kernel writes into the new buffers
        op, s_lo, s_hi, off, ids, lam, cv, cn, lo, hi, guard, rec = self._plan
        eta = self._eta if self._eta_at is None else self.step_size
        sig = self._sig if self._sig_at is None else self.sigma
        for k, g in enumerate(grads):
            if not g.is_contiguous():
                grads[k] = g.contiguous()
        op(self.state, grads, energy, self.step_t, s_lo, s_hi, off, ids, eta / 2,
           sig * math.sqrt(eta), lam, cv, cn, lo, hi, guard, *rec)
        if compiling:  # a constant store: no guard on a changing int (see _sync_host)
            self._host_stale = True
            return
        self._t += 1
        if rec[0] is not None:
            self.stats._steps += 1

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
            with torch.no_grad():  # (the energies' gradients are taken inside, with grad on)
                return mala_step(self, energy_fn)
        if self.create_graph:
            return differentiable_step(self, energy_fn)
        energy, grads = self._energy_grad(energy_fn, self.state)
        if self._plan is not None:  # a custom op on tensors that need no gradient: no no_grad()
            self._planned(grads, energy)
            return energy
        with torch.no_grad():
            self._ula_update(energy, grads)
        return energy

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same chains' noise: the seed, the global
        step, the chain ids and the statistics (the state tensors themselves are the caller's)."""
        d = {"seed": self.seed, "t": self.t, "sample_offset": self.sample_offset,
             "chain_ids": None if self.chain_ids is None else self.chain_ids.cpu()}
        if self.stats is not None:
            st = self.stats
            d["stats"] = {"steps": st.steps, "t0": st.t0, "buffer": st.buffer().cpu(),
                          "n_guarded": int(st.n_guarded)}
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore :meth:`state_dict` (the state tensors are bound as they are)."""
        self.seed, self.t = int(d["seed"]), int(d["t"])
        self.step_t.fill_(self.t)
        self.sample_offset = int(d.get("sample_offset", 0))
        ids = d.get("chain_ids")
        self.chain_ids = None if ids is None else ids.to(self.step_t.device)
        self._samples = self.chain_ids if self.chain_ids is not None else torch.arange(
            self.sample_offset, self.sample_offset + self.batch, device=self.step_t.device)
        st = d.get("stats")
        if st is not None and self.stats is not None:
            rows, _, batch = st["buffer"].shape
            if batch != self.batch or rows > self.stats.capacity:
                raise ValueError(f"stored statistics are ({rows}, {batch}), this sampler keeps "
                                 f"up to ({self.stats.capacity}, {self.batch})")
            self.stats._alloc(rows)
            self.stats._buf.copy_(st["buffer"])
            self.stats.steps, self.stats.t0 = int(st["steps"]), int(st.get("t0", 0))
            self.stats.n_guarded.fill_(int(st["n_guarded"]))
        self._cache = None
        self._kernels = self._make_kernels()
        self._plan = self._make_plan()

    # ----------------------------------------------------------------------------- graphs
    def graph_step(self, energy_fn: EnergyFn, warmup: int = 2) -> None:
        """Like :meth:`step`, replayed as one CUDA graph (energy forward, input gradient, fused
        update). The first call captures (after ``warmup`` eager steps on a side stream whose
        effect on the chains is undone); ``energy_fn`` must be capture-safe and static-shaped."""
        if not self.capturable:
            raise RuntimeError("graph_step needs FusedLangevin(..., capturable=True)")
        if self._eta_at is not None or self._sig_at is not None:
            raise RuntimeError("a CUDA graph replays constant step sizes: no schedules with "
                               "graph_step")
        if self._graph is None:
            capture(self, energy_fn, warmup)
        self._graph.replay()
        self.t += 1
        if self.stats is not None:
            self.stats.steps += 1
