"""``langevin_sample``: the functional form of :class:`FusedLangevin`, k-diffusion style."""

from __future__ import annotations

import functools

import torch

from .langevin import EnergyFn, FusedLangevin, Schedule

# auto progress (``disable=None``): no display for runs shorter than this many steps
_PROGRESS_MIN_STEPS = 100


def _frames(n_steps: int, thin: int) -> list[int]:
    """The steps after which a trajectory frame is taken: 0, thin, 2 thin, ... and n_steps."""
    steps = list(range(0, n_steps + 1, thin))
    if steps[-1] != n_steps:
        steps.append(n_steps)
    return steps


def langevin_sample(energy_fn: EnergyFn, state, n_steps: int, step_size: Schedule, *,
                    lam: float = 0.0, sigma: Schedule = 1.0, seed: int | None = None,
                    extra_args: dict | None = None, callback=None, disable: bool | None = None,
                    return_stats: bool = False, return_trajectory: bool = False, thin: int = 1,
                    create_graph: bool = False, **sampler_kwargs):
    """Run ``n_steps`` Langevin steps from ``state`` and return the final state.

    ``energy_fn(x, **extra_args)`` returns one energy per sample, shape (B,) (or (B, 1, ...));
    gradients are taken with respect to the state only (model parameters are left untouched).
    ``state`` is a (B, ...) tensor or a list of them and is not modified: the chains run on a
    copy. ``step_size`` and ``sigma`` are floats or schedules (callables of the global step,
    sequences indexed by it).

    ``callback({"i", "x", "energy", "sampler"})`` is called after every step (``x`` is the
    state after step ``i``). ``disable``: the progress display of :mod:`vaebm._progress`; None
    (auto) enables it for runs of at least 100 steps unless vaebm is quiet (``VAEBM_QUIET``),
    and even then nothing shows for a quick run (a tqdm bar after 2 s on a terminal, else a
    plain line every ``VAEBM_PROGRESS_INTERVAL`` = 10 s); ``False`` enables it whatever the
    length, ``True`` turns it off.

    Other keyword arguments go to :class:`FusedLangevin`: ``clip_grad_norm``,
    ``clip_grad_value``, ``clamp``, ``mala``, ``on_nonfinite``, ``backend``, ``sample_offset``,
    ``chain_ids`` (per-row noise keys, e.g. sample-bank indices), ``start_step`` (the global
    step of the first step: resume a chain, or key a second run's noise apart) and
    ``max_steps`` (rows of statistics kept; default ``min(n_steps, 1024)``, so the statistics'
    memory is bounded whatever ``n_steps`` is).

    ``create_graph=True`` (``backend="torch"``): the chains are differentiable. The state is
    cloned without being detached, and the returned state (and trajectory) carries gradients
    to the initial state and to the energy's parameters; the graph holds every step's
    activations, so memory grows with ``n_steps``.

    ``return_trajectory=True``: also return the states after steps ``0, thin, 2 thin, ...``,
    always including the initial state (frame 0) and the final state (the last frame, also when
    ``n_steps`` is not a multiple of ``thin``): a ``(frames, B, ...)`` tensor for a tensor
    state, a list of them for a list state. Memory: ``frames x`` the state's size
    (``n_steps // thin + 1`` or ``+ 2`` frames) on the state's device, allocated once up front;
    raise ``thin`` for long runs, or use ``callback`` to move frames elsewhere.

    Returns ``x``; ``(x, trajectory)``, ``(x, stats)`` or ``(x, trajectory, stats)`` with
    ``return_trajectory`` and/or ``return_stats``.
    """
    if int(n_steps) != n_steps or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative integer, got {n_steps}")
    if int(thin) != thin or thin < 1:
        raise ValueError(f"thin must be a positive integer, got {thin}")
    n_steps, thin = int(n_steps), int(thin)
    single = isinstance(state, torch.Tensor)
    states = [state] if single else list(state)
    if create_graph:  # a copy that stays in the graph: gradients reach the initial state
        x = [s.clone() for s in states]
    else:
        x = [s.detach().clone() for s in states]
    fn = functools.partial(energy_fn, **extra_args) if extra_args else energy_fn
    # statistics keep at most the last 1024 steps (max_steps= changes it): bounded memory
    max_steps = sampler_kwargs.pop("max_steps", max(1, min(n_steps, 1024)))
    sampler = FusedLangevin(x[0] if single else x, step_size, lam=lam, sigma=sigma, seed=seed,
                            max_steps=max_steps, create_graph=create_graph, **sampler_kwargs)

    def current():
        # create_graph replaces the state tensors each step: always read them from the sampler
        return sampler.state[0] if single else list(sampler.state)

    traj = frame_at = None
    if return_trajectory:
        frame_at = _frames(n_steps, thin)
        if create_graph:  # frames stay in the graph: stacked at the end
            traj = [[t] for t in sampler.state]
        else:
            traj = [torch.empty((len(frame_at),) + s.shape, dtype=s.dtype, device=s.device)
                    for s in sampler.state]
            for buf, s in zip(traj, sampler.state):
                buf[0].copy_(s)
    frame = 1

    from .._progress import Progress
    enabled = (None if n_steps >= _PROGRESS_MIN_STEPS else False) if disable is None \
        else not disable
    progress = Progress(n_steps, "langevin", "step", enabled=enabled)
    try:
        for i in range(n_steps):
            energy = sampler.step(fn)
            progress.update(1)
            if traj is not None and frame < len(frame_at) and i + 1 == frame_at[frame]:
                for k, s in enumerate(sampler.state):
                    if create_graph:
                        traj[k].append(s)
                    else:
                        traj[k][frame].copy_(s)
                frame += 1
            if callback is not None:
                callback({"i": i, "x": current(), "energy": energy, "sampler": sampler})
    finally:
        progress.close()

    out = [current()]
    if traj is not None:
        if create_graph:
            traj = [torch.stack(t) for t in traj]
        out.append(traj[0] if single else traj)
    if return_stats:
        out.append(sampler.stats)
    return out[0] if len(out) == 1 else tuple(out)
