"""Drawing VAEBM samples: eps-space Langevin chains on a VAE and an energy net (paper Sec. 3.1,
Appendix E), in batches, seeded so that sample i is the same whatever the batch size.

Chains start at eps ~ N(0, I) or, for a low-temperature start, at the eps of a VAE sample drawn at
temperature ``t`` (after BatchNorm readjustment when the VAE supports it) and encoded back. After
``steps`` Langevin steps the output is the decoder mean mu_x(z) of the last state, as in the
published code (``output="sample"`` returns T(eps) instead).

Randomness: the initial eps of sample i come from Philox with counter (elem, i, step=0,
stream 3) under ``seed``, and the chain noise from FusedLangevin with ``sample_offset`` = i, so
the result does not depend on ``batch``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from ..models.eps_space import EpsVAE, eps_energy_fn
from ..ops.philox import philox_normal_rows
from .langevin import FusedLangevin

STREAM_INIT = 3


def initial_eps(vae: EpsVAE, start: int, batch: int, seed: int, *, device=None,
                dtype=torch.float32) -> list[torch.Tensor]:
    """eps ~ N(0, I) for samples start..start+batch-1 (Philox; independent of batching).
    Shapes: ``vae.eps_shapes(batch)``."""
    samples = torch.arange(start, start + batch, dtype=torch.int64, device=device)
    out = []
    for k, shape in enumerate(vae.eps_shapes(batch)):
        n = math.prod(shape[1:])
        z = philox_normal_rows(seed, 0, samples, n, tensor=k, stream=STREAM_INIT)
        out.append(z.view(shape).to(dtype))
    return out


@contextlib.contextmanager
def frozen_params(*modules):
    """Parameters of the given modules (non-modules ignored) with requires_grad False inside the
    block, restored after: chains need gradients for the state only, never for the weights."""
    saved = [(p, p.requires_grad) for m in modules if isinstance(m, torch.nn.Module)
             for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


def _fast(model):
    """The model's sampling mode (cached normalised weights, folded BatchNorm) when it has one:
    the weights are constant for the whole run, so recomputing their norms every step is waste."""
    frozen = getattr(model, "frozen", None)
    return frozen() if callable(frozen) else contextlib.nullcontext()


def _check(vae, energy, n, steps, step_size, batch):
    if not isinstance(vae, EpsVAE):
        raise TypeError(f"vae must implement the eps-space contract (eps_shapes, decode_eps, "
                        f"encode_eps); got {type(vae).__name__}")
    if not callable(energy):
        raise TypeError("energy must be callable: x -> (B,) energies")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be positive, got {step_size}")
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")


@torch.no_grad()
def low_temperature_start(vae: EpsVAE, start: int, batch: int, seed: int, t: float,
                          *, device=None) -> list[torch.Tensor]:
    """eps of VAE samples drawn at temperature ``t`` and encoded back (posterior mean for the
    latent groups, eps_x solving x = T_x(z, eps_x))."""
    eps = initial_eps(vae, start, batch, seed, device=device)
    x = vae.decode_eps(eps, t=t).x_mean
    return [e.to(eps[0].dtype) for e in vae.encode_eps(x, use_mean=True)]


def vaebm_sample(vae: EpsVAE, energy: Callable[[torch.Tensor], torch.Tensor], n: int, *,
                 steps: int = 16, step_size: float = 8e-5, batch: int = 50, mode: str = "paper",
                 negative: str = "sample", output: str = "mean", start: str = "noise",
                 start_t: float = 0.7, seed: int = 0, every: int = 0, device=None,
                 backend: str | None = None, callback=None, progress: bool = False,
                 first_index: int = 0) -> dict:
    """``n`` VAEBM samples in batches of ``batch``.

    Returns a dict with
      ``samples`` (n, C, H, W) in [0, 1] on the CPU (decoder mean of the last state, or T(eps)),
      ``initial`` the same for the chains' starting points (the VAE's own samples: before/after
      pairs as Fig. 12), ``chain`` (k, n, C, H, W) every ``every`` steps when ``every > 0``
      (Fig. 2b), ``energy`` (n,) the energy-net value of the final ``samples``, and the settings.
    ``first_index``: global index of the first sample, so successive calls with
    first_index = 0, n, 2n, ... continue one seeded sequence instead of repeating it.
    """
    _check(vae, energy, n, steps, step_size, batch)
    if output not in ("mean", "sample"):
        raise ValueError(f"output must be 'mean' or 'sample', got {output!r}")
    if start not in ("noise", "low_temp"):
        raise ValueError(f"start must be 'noise' or 'low_temp', got {start!r}")
    if int(every) != every or every < 0:
        raise ValueError(f"every must be a non-negative integer (0: no chain frames), got {every}")
    if not (math.isfinite(start_t) and start_t >= 0):
        raise ValueError(f"start_t (the start's temperature) must be non-negative, got {start_t}")
    if int(first_index) != first_index or first_index < 0:
        raise ValueError(f"first_index must be a non-negative integer, got {first_index}")
    fn, lam = eps_energy_fn(vae, energy, mode, negative=negative)
    # the decoder mean can leave [0, 1] slightly (the sample is clamped by T); images are [0, 1]
    pick = (lambda d: d.x_mean.clamp(0.0, 1.0)) if output == "mean" else (lambda d: d.x_sample)
    outs, inits, chains, energies = [], [], [], []
    batches = range(0, int(n), int(batch))
    if progress:  # a bar or periodic lines (vaebm._progress: no tqdm needed), quiet under --quiet
        from .._progress import progress_iter
        batches = progress_iter(batches, total=len(batches), desc="sampling",
                                unit="batch")
    def one_batch(b0, bs):
        """Chains for samples b0..b0+bs-1: (start images, final images, their energies, frames)."""
        if start == "noise":
            eps = initial_eps(vae, b0, bs, seed, device=device)
        else:
            eps = low_temperature_start(vae, b0, bs, seed, start_t, device=device)
        with torch.no_grad():
            init = pick(vae.decode_eps(eps)).float().cpu()
        sampler = FusedLangevin(eps, step_size, lam=lam, seed=seed, sample_offset=b0,
                                backend=backend, max_steps=max(1, int(steps)))
        frames = []
        for i in range(int(steps)):
            sampler.step(fn)
            if every and (i + 1) % every == 0:
                with torch.no_grad():
                    frames.append(pick(vae.decode_eps(eps)).float().cpu())
            if callback is not None:
                callback({"i": i, "batch_start": b0, "eps": eps, "sampler": sampler})
        with torch.no_grad():
            x = pick(vae.decode_eps(eps))
            e = energy(x).float().reshape(-1).cpu()
        return init, x.float().cpu(), e, frames

    with frozen_params(vae, energy), _fast(vae), _fast(energy):
        for b0 in batches:
            init, x, e, frames = one_batch(int(first_index) + b0, min(int(batch), int(n) - b0))
            inits.append(init)
            outs.append(x)
            energies.append(e)
            if frames:
                chains.append(torch.stack(frames))
    res = {"samples": torch.cat(outs), "initial": torch.cat(inits), "energy": torch.cat(energies),
           "settings": {"n": int(n), "steps": int(steps), "step_size": float(step_size),
                        "batch": int(batch), "mode": mode, "negative": negative, "output": output,
                        "start": start, "start_t": float(start_t), "seed": int(seed),
                        "first_index": int(first_index)}}
    if chains:
        res["chain"] = torch.cat(chains, dim=1)
    return res

