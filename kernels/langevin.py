"""Triton kernels of the fused Langevin ops (the specification is vaebm/ops/langevin_ref.py).

Both ops run as ONE launch over every tensor of the state list. The launcher builds a small
int64 device table, cached by the tensors' addresses and sizes so that repeated calls on the
same buffers (and CUDA-graph replays) copy nothing to the device::

    row k (W = 8 words): x, g, o, other (addresses), n_k (elements per sample),
                         start (first program of tensor k), cpr (programs per sample row),
                         slot (first partial-sum slot of tensor k; reduce only)
    then, per program:   k (the tensor it works on)

Program ``pid`` of tensor k handles sample row ``(pid - start) // cpr`` and the chunk
``(pid - start) % cpr`` of that row, so a program never straddles two samples: the per-sample
scalars (mode, gscale) are scalar loads and the mode is a scalar branch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _uniform(r):
    """uint32 word -> float32 uniform in [0, 1), exactly as vaebm.ops.philox._uniform."""
    x = r.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _box_muller(ua, ub):
    r = tl.sqrt_rn(-2.0 * tl.log(tl.maximum(ua, 1e-7)))  # sqrt_rn: tl.sqrt is approximate on GPU
    th = ub * 6.283185307179586
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _normals(grp, sample, step, c3, k0, k1, BLOCK: tl.constexpr):
    """Normals of elements 4*grp + (0..3) as one flat (BLOCK,) tensor: ONE Philox4x32-10 call
    per group of four elements, counter (grp, sample, step, c3) and key (k0, k1)."""
    c0 = grp.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + sample.to(tl.uint32)
    c2 = zero + step.to(tl.uint32)
    c3 = zero + c3.to(tl.uint32)
    k0 = k0.to(tl.uint32)
    k1 = k1.to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    n0, n1 = _box_muller(_uniform(c0), _uniform(c1))
    n2, n3 = _box_muller(_uniform(c2), _uniform(c3))
    # join stacks along a new last axis: t[g, b, a] = (n0, n2 | n1, n3)[a][b], flat 4g + 2b + a,
    # i.e. lanes n0 n1 n2 n3 in element order. join keeps a group's four lanes in one thread, so
    # no thread recomputes another's Philox call.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))


@triton.jit
def _to_dtype(y, DT: tl.constexpr):
    """Round float32 to DT to nearest even; bf16 by integer arithmetic, because the interpreter
    truncates float32 -> bfloat16 (on a GPU this equals cvt.rn.bf16.f32)."""
    if DT == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)  # NaN stays NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DT)


@triton.jit
def _locate(tab, T, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """(k, table row, sample row, element offsets of this program's chunk, mask, n_k, chunk)."""
    pid = tl.program_id(0)
    k = tl.load(tab + T * 8 + pid)
    row_ptr = tab + k * 8
    n = tl.load(row_ptr + 4)
    cpr = tl.load(row_ptr + 6)
    local = pid - tl.load(row_ptr + 5)
    row = local // cpr
    chunk = local % cpr
    if VEC > 1:  # every address is 16-byte aligned and n_k % VEC == 0: allow vector accesses
        n = tl.multiple_of(n, VEC)
    j = chunk * BLOCK + tl.arange(0, BLOCK)
    return k, row_ptr, row, row * n + j, j < n, chunk


@triton.jit
def _ptr(row_ptr, word, DT: tl.constexpr, VEC: tl.constexpr):
    p = tl.load(row_ptr + word).to(tl.pointer_type(DT))
    if VEC > 1:
        p = tl.multiple_of(p, 16)
    return p


# Paper (VAEBM, Xiao et al. 2021) Eq. 2, Langevin dynamics in eps-space with the standard-normal
# base density of Eq. 9 (lam = 1), per element of sample i:
#     eps <- eps - a * (s_i * clip(g) + lam * eps) + b * xi,   a = eta / 2,  b = sigma * sqrt(eta)
# xi = Philox normal of counter (j >> 2, sample_offset + i, step, k), lane j & 3 (stream 0).
# mode_i: 0 the update, 1 keep the old state (bit-identical), 2 reset to N(0, I) from stream 2.
# The result (modes 0 and 2) is clamped to [lo, hi] keeping NaN, computed in float32.
@triton.jit(do_not_specialize=["T", "sample_offset", "k0", "k1"])
def _update_kernel(tab, T, step_ptr, gs_ptr, mode_ptr, sample_offset, k0, k1,
                   a, b, lam, cv, lo, hi, DT: tl.constexpr, BLOCK: tl.constexpr,
                   VEC: tl.constexpr, HAS_GS: tl.constexpr, HAS_MODE: tl.constexpr):
    k, row_ptr, row, offs, mask, chunk = _locate(tab, T, BLOCK, VEC)
    xp = _ptr(row_ptr, 0, DT, VEC)
    op = _ptr(row_ptr, 2, DT, VEC)
    m = 0
    if HAS_MODE:
        m = tl.load(mode_ptr + row)
    if m == 1:  # MODE_KEEP: the old state, untouched (nothing to do in place)
        if tl.load(row_ptr + 2) != tl.load(row_ptr + 0):
            tl.store(op + offs, tl.load(xp + offs, mask=mask), mask=mask)
    else:
        reset = m == 2  # MODE_RESET: noise from stream 2
        c3 = tl.where(reset, 2 << 24, 0) | k
        grp = chunk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        xi = _normals(grp, sample_offset + row, tl.load(step_ptr), c3, k0, k1, BLOCK)
        x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(_ptr(row_ptr, 1, DT, VEC) + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(g < -cv, -cv, tl.where(g > cv, cv, g))
        if HAS_GS:
            g = g * tl.load(gs_ptr + row)
        y = x - a * (g + lam * x) + b * xi
        y = tl.where(reset, xi, y)
        y = tl.where(y < lo, lo, tl.where(y > hi, hi, y))
        tl.store(op + offs, _to_dtype(y, DT), mask=mask)


@triton.jit
def _not_finite(v):
    return ((v != v) | (tl.abs(v) == float("inf"))).to(tl.float32)


# Per-sample partial sums of one chunk (columns as in vaebm.ops.langevin_ref.reduce_ref):
#   0: sum clip(g)^2   1: non-finite entries of x and g   2: sum x^2
#   3: sum (o - x + a * (s_i clip(g) + lam x))^2   (0 without o)
# written to part[row, slot + chunk, :]; the host sums the slots (deterministic, no atomics).
@triton.jit(do_not_specialize=["T", "S"])
def _reduce_kernel(tab, T, part, S, gs_ptr, a, lam, cv, DT: tl.constexpr, BLOCK: tl.constexpr,
                   VEC: tl.constexpr, HAS_GS: tl.constexpr, HAS_OTHER: tl.constexpr):
    k, row_ptr, row, offs, mask, chunk = _locate(tab, T, BLOCK, VEC)
    x = tl.load(_ptr(row_ptr, 0, DT, VEC) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(_ptr(row_ptr, 1, DT, VEC) + offs, mask=mask, other=0.0).to(tl.float32)
    bad = _not_finite(x) + _not_finite(g)
    g = tl.where(g < -cv, -cv, tl.where(g > cv, cv, g))
    out = part + (row * S + tl.load(row_ptr + 7) + chunk) * 4
    tl.store(out + 0, tl.sum(g * g, axis=0))
    tl.store(out + 1, tl.sum(bad, axis=0))
    tl.store(out + 2, tl.sum(x * x, axis=0))
    d2 = 0.0
    if HAS_OTHER:
        o = tl.load(_ptr(row_ptr, 3, DT, VEC) + offs, mask=mask, other=0.0).to(tl.float32)
        s = g
        if HAS_GS:
            s = g * tl.load(gs_ptr + row)
        d = o - x + a * (s + lam * x)
        d2 = tl.sum(d * d, axis=0)
    tl.store(out + 3, d2)


_TABLES: dict = {}


def _block(lists, gpu_block):
    """Elements per program: fixed on a GPU; under the interpreter (~10 ms per program) one
    program per sample row of the largest tensor."""
    if not _INTERPRET:
        return gpu_block
    n_max = max(t[0].numel() // t[0].shape[0] for t in lists)
    return min(max(triton.next_power_of_2(n_max), 64), 1 << 16)


def _plan(lists, block):
    """Cached (device table, programs, slots per sample, VEC) for tensors ``lists`` =
    [(x, g, o, other), ...] (o and other may be None) and ``block`` elements per program."""
    x0 = lists[0][0]
    B = x0.shape[0]
    ptrs = tuple(0 if t is None else t.data_ptr() for ts in lists for t in ts)
    ns = tuple(ts[0].numel() // B for ts in lists)
    key = (x0.device, x0.dtype, B, block, ptrs, ns)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    rows, kmap, start, slot = [], [], 0, 0
    for k, (ts, n) in enumerate(zip(lists, ns)):
        cpr = triton.cdiv(n, block)
        rows += list(ptrs[4 * k:4 * k + 4]) + [n, start, cpr, slot]
        kmap += [k] * (B * cpr)
        start, slot = start + B * cpr, slot + cpr
    vec = 16 // x0.element_size()
    aligned = all(p % 16 == 0 for p in ptrs) and all(n % vec == 0 for n in ns)
    tab = torch.tensor(rows + kmap, dtype=torch.int64).to(x0.device)
    if len(_TABLES) > 256:
        _TABLES.clear()
    _TABLES[key] = hit = (tab, start, slot, vec if aligned else 1)
    return hit


def update_(states, grads, outs, *, step, seed, sample_offset, a, b, lam, clip_value, lo, hi,
            gscale=None, mode=None, block=None):
    """Fused Langevin update of every state tensor in one launch (see langevin_ref.update_ref)."""
    lists = [(x, g, o, None) for x, g, o in zip(states, grads, outs)]
    block = block or _block(lists, 1024)
    tab, progs, _, vec = _plan(lists, block)
    step = step.reshape(1)
    _update_kernel[(progs,)](
        tab, len(lists), step, step if gscale is None else gscale,
        step if mode is None else mode, int(sample_offset), seed & 0xFFFFFFFF,
        (seed >> 32) & 0xFFFFFFFF, float(a), float(b), float(lam),
        float(clip_value) if clip_value > 0 else float("inf"), float(lo), float(hi),
        DT=_TL_DTYPE[states[0].dtype], BLOCK=block, VEC=vec, HAS_GS=gscale is not None,
        HAS_MODE=mode is not None, num_warps=4)


def reduce(states, grads, others=None, *, a, lam, clip_value, gscale=None, block=None):
    """(B, 4) float32 per-sample sums (see langevin_ref.reduce_ref), deterministic."""
    lists = [(x, g, None, None if others is None else others[k])
             for k, (x, g) in enumerate(zip(states, grads))]
    block = block or _block(lists, 2048)
    tab, progs, slots, vec = _plan(lists, block)
    B = states[0].shape[0]
    part = torch.empty(B, slots, 4, dtype=torch.float32, device=states[0].device)
    _reduce_kernel[(progs,)](
        tab, len(lists), part, slots, part if gscale is None else gscale, float(a), float(lam),
        float(clip_value) if clip_value > 0 else float("inf"), DT=_TL_DTYPE[states[0].dtype],
        BLOCK=block, VEC=vec, HAS_GS=gscale is not None, HAS_OTHER=others is not None,
        num_warps=8)
    return part.sum(1)
