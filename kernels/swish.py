"""Triton kernels of the scaled Swish with its fused bias add (spec: ``_torch_fwd``,
``_torch_bwd``, ``_torch_bwd2`` in vaebm/ops/swish.py).

One elementwise launch per op over the memory of x: x, grad, gg and the output share one dense
layout (contiguous or channels_last), so element i of each is at offset i, and its channel is
``(i // inner) % C`` with inner = prod(shape[2:]) (contiguous) or 1 (channels_last).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# torch.library.triton_op traces kernels started through wrap_triton (torch >= 2.6)
_wrap = getattr(torch.library, "wrap_triton", lambda kernel: kernel)

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
FWD, BWD, BWD2 = 0, 1, 2


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


# VAEBM energy net (paper Table 7): Swish scaled by 1/1.1 to be 1-Lipschitz. y = x + bias[c],
# s = sigmoid(y):
#     FWD:   out    = y s / 1.1
#     BWD:   grad_y = grad * s (1 + y (1 - s)) / 1.1
#     BWD2:  grad_x = gg * grad * s (1 - s) (2 + y (1 - 2 s)) / 1.1
# s and 1 - s from e = exp(-|y|) in (0, 1], r = 1 / (1 + e): (s, 1 - s) = (r, e r) for y >= 0,
# (e r, r) for y < 0: no overflow, and 1 - s keeps its relative precision where s -> 1.
# Computed in float32 whatever the storage dtype (tl.sigmoid rejects fp16/bf16).
@triton.jit
def _swish_kernel(x_ptr, g_ptr, h_ptr, b_ptr, o_ptr, n, C, inner, OP: tl.constexpr,
                  HAS_BIAS: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
                  WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:  # more than 2^31 elements: 64-bit offsets
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + (offs // inner) % C, mask=mask, other=0.0)
    e = tl.exp(-tl.abs(y))
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = y >= 0.0
    s = tl.where(pos, r, er)
    sc = tl.where(pos, er, r)
    if OP == 0:
        out = y * s
    elif OP == 1:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = g * (s * (1.0 + y * sc))
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = h * g * (s * sc * (2.0 + y * (sc - s)))
    tl.store(o_ptr + offs, _to_dtype(out * 0.9090909090909091, DT), mask=mask)


def _launch(op, x, g, h, bias):
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    if x.is_cpu:  # interpreter: ~10 ms per program whatever its size, so few big ones
        block = min(max(triton.next_power_of_2(n), 64), 1 << 16)
    else:
        block = 1024
    C = inner = 1
    b = x  # any pointer; unused without a bias
    if bias is not None:
        C = x.shape[1]
        inner = x.numel() // (x.shape[0] * C) if x.is_contiguous() else 1  # else channels_last
        b = bias.to(torch.float32).contiguous()
    _wrap(_swish_kernel)[(triton.cdiv(n, block),)](
        x, x if g is None else g, x if h is None else h, b, out, n, C, inner, OP=op,
        HAS_BIAS=bias is not None, DT=_TL_DTYPE[x.dtype], BLOCK=block,
        WIDE=n + block >= 2**31, num_warps=4)
    return out


def swish_fwd(x, bias):
    """silu(x + bias[c]) / 1.1 (x contiguous or channels_last, bias (C,) or None)."""
    return _launch(FWD, x, None, None, bias)


def swish_bwd(grad, x, bias):
    """grad * swish'(x + bias[c])."""
    return _launch(BWD, x, grad, None, bias)


def swish_bwd2(gg, grad, x, bias):
    """gg * grad * swish''(x + bias[c])."""
    return _launch(BWD2, x, grad, gg, bias)
