"""Triton kernels of the weight-norm reparameterisation of all output channels in one launch
(spec: ``_torch_fwd`` / ``_torch_bwd`` in vaebm/ops/weight_norm.py).

v (R, K) row-major, one row per output channel. A program owns ROWS whole rows and walks them
in (ROWS, BLOCK_K) tiles: a first sweep for the row sums, a second for the output, so no row
is ever split between programs and nothing is reduced across programs.

The K loops run over a compile-time tile count ``K_TILES = cdiv(K, BLOCK_K)``, never
``range(0, K, BLOCK_K)`` on the runtime ``K``: Triton's interpreter up to 3.6 turns a runtime
int bound into a Python int with ``int()`` of a 1-element array, which NumPy >= 2.4 refuses
("only 0-dimensional arrays can be converted to Python scalars", triton-lang/triton#9171, fixed
in Triton 3.7). Compiled, this only adds one specialisation per distinct tile count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .swish import _TL_DTYPE, _to_dtype, _wrap

EPS = 1e-12  # as vaebm.ops.weight_norm.EPS


@triton.jit
def _tile(pid, k0, R, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = k0 + tl.arange(0, BLOCK_K)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    return offs, (rows < R)[:, None] & (cols < K)[None, :]


@triton.jit
def _clamp_eps(norm, EPS: tl.constexpr):
    return tl.where(norm < EPS, EPS, norm)  # clamp_min, NaN kept (tl.maximum may drop it)


# Salimans & Kingma (2016) with the log-scale parameter of the VAEBM/NVAE convs; per row o,
# n_o = max(||v_o||, EPS), g_o = exp(log_g[o]):   w_o = (g_o / n_o) v_o.  Math in float32.
@triton.jit
def _wn_fwd_kernel(v_ptr, lg_ptr, w_ptr, R, K, EPS: tl.constexpr, DT: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for t in range(K_TILES):
        offs, m = _tile(pid, t * BLOCK_K, R, K, ROWS, BLOCK_K)
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        acc += v * v
    rows = pid * ROWS + tl.arange(0, ROWS)
    norm = _clamp_eps(tl.sqrt_rn(tl.sum(acc, axis=1)), EPS)  # sqrt_rn: tl.sqrt is approximate
    g = tl.exp(tl.load(lg_ptr + rows, mask=rows < R, other=0.0))
    a = (g / norm)[:, None]
    for t in range(K_TILES):
        offs, m = _tile(pid, t * BLOCK_K, R, K, ROWS, BLOCK_K)
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(w_ptr + offs, _to_dtype(v * a, DT), mask=m)


# With G = dL/dw and proj_o = <G_o, v_o> / n_o:
#     dL/dv_o = (g_o / n_o) (G_o - (proj_o / n_o) v_o),    dL/dlog_g[o] = g_o proj_o.
@triton.jit
def _wn_bwd_kernel(gw_ptr, v_ptr, lg_ptr, gv_ptr, gl_ptr, R, K, EPS: tl.constexpr,
                   DT: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                   K_TILES: tl.constexpr):
    pid = tl.program_id(0)
    ss = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    dot = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for t in range(K_TILES):
        offs, m = _tile(pid, t * BLOCK_K, R, K, ROWS, BLOCK_K)
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        G = tl.load(gw_ptr + offs, mask=m, other=0.0).to(tl.float32)
        ss += v * v
        dot += G * v
    rows = pid * ROWS + tl.arange(0, ROWS)
    norm = _clamp_eps(tl.sqrt_rn(tl.sum(ss, axis=1)), EPS)
    g = tl.exp(tl.load(lg_ptr + rows, mask=rows < R, other=0.0))
    proj = tl.sum(dot, axis=1) / norm
    tl.store(gl_ptr + rows, g * proj, mask=rows < R)
    a = (g / norm)[:, None]
    c = (proj / norm)[:, None]
    for t in range(K_TILES):
        offs, m = _tile(pid, t * BLOCK_K, R, K, ROWS, BLOCK_K)
        v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        G = tl.load(gw_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(gv_ptr + offs, _to_dtype(a * (G - c * v), DT), mask=m)


def _plan(v):
    """(R, K, ROWS, BLOCK_K, K_TILES, programs). The interpreter costs ~10 ms per program
    whatever its size, so there the tiles are as large as memory allows."""
    R = v.shape[0]
    K = v.numel() // R
    cap_k, tile = (1 << 14, 1 << 17) if v.is_cpu else (1024, 1024)
    block_k = min(max(triton.next_power_of_2(K), 16), cap_k)
    rows = max(1, min(triton.next_power_of_2(R), tile // block_k))
    return R, K, rows, block_k, triton.cdiv(K, block_k), triton.cdiv(R, rows)


def weight_norm_fwd(v, log_g):
    """w[o] = exp(log_g[o]) v[o] / ||v[o]|| for contiguous v (C_out, ...), log_g (C_out,)."""
    w = torch.empty_like(v)
    if v.numel() == 0:
        return w
    R, K, rows, block_k, k_tiles, progs = _plan(v)
    _wrap(_wn_fwd_kernel)[(progs,)](v, log_g.to(torch.float32).contiguous(), w, R, K, EPS=EPS,
                             DT=_TL_DTYPE[v.dtype], ROWS=rows, BLOCK_K=block_k, K_TILES=k_tiles,
                             num_warps=4)
    return w


def weight_norm_bwd(grad_w, v, log_g):
    """(dL/dv, dL/dlog_g) given dL/dw, all contiguous; dL/dlog_g has log_g's dtype."""
    gv = torch.empty_like(v)
    gl = torch.zeros(v.shape[0], dtype=torch.float32, device=v.device)
    if v.numel() == 0:
        return gv, gl.to(log_g.dtype)
    R, K, rows, block_k, k_tiles, progs = _plan(v)
    _wrap(_wn_bwd_kernel)[(progs,)](grad_w, v, log_g.to(torch.float32).contiguous(), gv, gl, R, K,
                             EPS=EPS, DT=_TL_DTYPE[v.dtype], ROWS=rows, BLOCK_K=block_k,
                             K_TILES=k_tiles, num_warps=4)
    return gv, gl.to(log_g.dtype)
