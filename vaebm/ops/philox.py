"""Counter-based Philox4x32-10 normals: the reference every backend reproduces.

Langevin noise is a pure function of (seed, step, sample index, element index), so a chain
does not depend on the batch it runs in, and no noise tensor ever goes through memory.

Counter and key (all uint32 words)::

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (j >> 2, sample, step, (stream << 24) | tensor)

``j`` is the element's index within one sample of one state tensor (row-major), ``tensor`` the
position of that tensor in the state list. One Philox call yields four uint32 words r0..r3, turned
into four normals by Box-Muller on the pairs (r0, r1) and (r2, r3); element ``j`` takes lane
``j & 3``::

    u  = float32(x if x >= 0 else ~x) * float32(4.6566127342e-10)   (x: the word as int32)
    n0 = sqrt(-2 log max(u0, 1e-7)) * cos(6.283185307179586 * u1)    n1 = ... * sin(...)
    n2 = sqrt(-2 log max(u2, 1e-7)) * cos(6.283185307179586 * u3)    n3 = ... * sin(...)

which is Triton's ``tl.randn4x`` arithmetic applied to our counter. All arithmetic is float32.
Streams: 0 Langevin noise, 1 MALA accept uniforms, 2 reset noise for guarded chains.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32", "philox_normal", "philox_normal_rows", "philox_uniform", "STREAM_NOISE", "STREAM_ACCEPT",
           "STREAM_RESET"]

STREAM_NOISE, STREAM_ACCEPT, STREAM_RESET = 0, 1, 2

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl)
_MASK = 0xFFFFFFFF
_U32_SCALE = 4.6566127342e-10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a*b for a constant a < 2**32 and int64 b in [0, 2**32).

    int64 cannot hold a 64-bit product, so b is split in 16-bit halves (all partial products
    stay below 2**49).
    """
    bh, bl = b >> 16, b & 0xFFFF
    pl = a * bl
    t = a * bh + (pl >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (pl & 0xFFFF)


def philox4x32(c0, c1, c2, c3, seed: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns four int64 tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def _uniform(r: torch.Tensor) -> torch.Tensor:
    x = torch.where(r >= 2**31, r - 2**32, r)  # the word as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_U32_SCALE, dtype=torch.float32, device=r.device)


def _box_muller(ua: torch.Tensor, ub: torch.Tensor):
    r = torch.sqrt(-2.0 * torch.log(torch.clamp(ua, min=1e-7)))
    th = ub * torch.tensor(6.283185307179586, dtype=torch.float32, device=ua.device)
    return r * torch.cos(th), r * torch.sin(th)


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def philox_normal(seed: int, step, sample, elem, tensor=0, stream: int = STREAM_NOISE):
    """Standard normals (float32) for the given counters; arguments broadcast.

    ``step``, ``sample``, ``elem`` and ``tensor`` may be ints or int64 tensors (``step`` may be a
    one-element device tensor, as in capturable mode). The result lives on the device of the
    tensor arguments.
    """
    seed = _check_seed(seed)
    elem = torch.as_tensor(elem, dtype=torch.int64)
    dev = elem.device
    sample = torch.as_tensor(sample, dtype=torch.int64, device=dev)
    step = torch.as_tensor(step, dtype=torch.int64, device=dev)
    tensor = torch.as_tensor(tensor, dtype=torch.int64, device=dev)
    c3 = (int(stream) << 24) | tensor
    r0, r1, r2, r3 = philox4x32(elem >> 2, sample, step, c3, seed)
    n0, n1 = _box_muller(_uniform(r0), _uniform(r1))
    n2, n3 = _box_muller(_uniform(r2), _uniform(r3))
    lane = elem & 3
    return torch.where(lane == 0, n0, torch.where(lane == 1, n1, torch.where(lane == 2, n2, n3)))


def philox_normal_rows(seed: int, step, samples: torch.Tensor, n: int, tensor: int = 0,
                       stream: int = STREAM_NOISE) -> torch.Tensor:
    """Normals for elements 0..n-1 of each sample in ``samples`` (shape (S,)): (S, n) float32.

    Equal to ``philox_normal(seed, step, samples[:, None], arange(n), tensor, stream)`` but one
    Philox call per group of four elements instead of per element.
    """
    seed = _check_seed(seed)
    dev = samples.device
    groups = torch.arange((n + 3) // 4, dtype=torch.int64, device=dev).unsqueeze(0)
    step = torch.as_tensor(step, dtype=torch.int64, device=dev)
    r = philox4x32(groups, samples.to(torch.int64).unsqueeze(1), step,
                   (int(stream) << 24) | int(tensor), seed)
    n0, n1 = _box_muller(_uniform(r[0]), _uniform(r[1]))
    n2, n3 = _box_muller(_uniform(r[2]), _uniform(r[3]))
    return torch.stack([n0, n1, n2, n3], -1).reshape(samples.shape[0], -1)[:, :n]


def philox_uniform(seed: int, step, sample, stream: int = STREAM_ACCEPT):
    """One uniform in [0, 1) per sample (lane 0 of counter (0, sample, step, stream << 24))."""
    seed = _check_seed(seed)
    sample = torch.as_tensor(sample, dtype=torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=sample.device)
    r0, _, _, _ = philox4x32(torch.zeros_like(sample), sample, step, int(stream) << 24, seed)
    return _uniform(r0)
