"""Scaled Swish, optionally fused with the bias add of the conv before it.

Maths (y = x + bias[c], broadcast over dim 1; s = sigmoid(y)):

    swish(y)    = y * s / 1.1                    (1/1.1 makes it 1-Lipschitz: max silu' ~ 1.0998)
    swish'(y)   = s * (1 + y * (1 - s)) / 1.1
    swish''(y)  = s * (1 - s) * (2 + y * (1 - 2s)) / 1.1
    swish'''(y) = s * (1 - s) * (3 * (1 - 2s) + y * (1 - 6s + 6s^2)) / 1.1

Three custom ops carry it through the dispatcher, each differentiable so that double backward
(gradient penalties, MALA) works and torch.compile sees opaque, shape-known ops:

    vaebm::swish(x, bias, backend)                        -> out          (forward)
    vaebm::swish_backward(grad, x, bias, backend)         -> grad_y       (first derivative)
    vaebm::swish_backward2(gg, grad, x, bias, backend)    -> grad_x of it (second derivative)

The third derivative, needed only to differentiate ``swish_backward2``, is plain PyTorch.

Backend seam: the kernels ``vaebm::swish_fwd(x, bias)``, ``swish_bwd(grad, x, bias)`` and
``swish_bwd2(gg, grad, x, bias)`` (declared in :mod:`._library`; C++ CPU and CUDA
implementations, Triton ones as ``vaebm::triton_swish_*``) have the semantics of
:func:`_torch_fwd`, :func:`_torch_bwd`, :func:`_torch_bwd2`; :data:`SWISH` says which backend
serves which dtypes. They get x, grad, gg of one dtype, one shape and identical dense strides
(contiguous or channels_last), bias None or contiguous (C,) of any float dtype, and return a
tensor of x's dtype; half types are computed in fp32 (the C++ CPU kernels also take float64, so
gradcheck runs on them). ``auto`` skips a backend lacking the function or the dtype; a backend
named explicitly raises instead (:func:`vaebm.ops._registry.resolve_op`).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library  # noqa: F401  (the op schemas)
from . import _registry
from ._registry import Kernel

log = logging.getLogger("vaebm")

SCALE = 1.0 / 1.1
LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def swish_ref(x: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: silu(x + bias[c]) / 1.1 in readable PyTorch. x (B, C, ...), bias (C,) or None.

    fp16/bf16 inputs are computed in fp32 and rounded once at the end.
    """
    y = x.float() if x.dtype in LOW_PRECISION else x
    if bias is not None:
        y = y + _bcast(bias.to(y.dtype), x.ndim)
    return (y * torch.sigmoid(y) / 1.1).to(x.dtype)


# ------------------------------------------------------------------ backend tables
CPU_DTYPES = (*KERNEL_DTYPES, torch.float64)
SWISH = {fn: {"cpp": Kernel("cpu_nn", fn, CPU_DTYPES),
              "cuda": Kernel("cuda_nn", fn, KERNEL_DTYPES),
              "triton": Kernel("triton", "triton_" + fn, KERNEL_DTYPES)}
         for fn in ("swish_fwd", "swish_bwd", "swish_bwd2")}


def _bcast(bias: Tensor, ndim: int) -> Tensor:
    return bias.view(1, -1, *([1] * (ndim - 2)))


def _dense(t: Tensor) -> Tensor:
    """t itself if its strides are contiguous or channels_last, else a contiguous copy."""
    if t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _like(out: Tensor, x: Tensor) -> Tensor:
    """``out`` with x's dtype and strides (what the fake kernel promises: empty_like(x))."""
    if out.dtype == x.dtype and out.stride() == x.stride():
        return out
    res = torch.empty_like(x)
    res.copy_(out)
    return res


def _run(fn: str, backend: str, x: Tensor, tensors: list[Tensor], bias: Tensor | None, torch_impl):
    name, kernel = _registry.resolve_op(SWISH[fn], x.device, x.dtype, backend or None)
    if kernel is None:
        return torch_impl(*tensors, bias)
    lay = _dense(x)
    # every tensor gets the layout of x so a kernel can index them all with one set of strides
    args = [t if t.stride() == lay.stride() else _restride(t, lay) for t in tensors[:-1]] + [lay]
    return _like(kernel(*args, None if bias is None else bias.contiguous()), x)


def _restride(t: Tensor, like: Tensor) -> Tensor:
    out = torch.empty_like(like, dtype=t.dtype)
    out.copy_(t)
    return out


# ------------------------------------------------------------------ PyTorch implementation
def _pre(x: Tensor, bias: Tensor | None) -> Tensor:
    """y = x + bias in the compute dtype (fp32 for half inputs)."""
    y = x.float() if x.dtype in LOW_PRECISION else x
    if bias is not None:
        y = y + _bcast(bias.to(y.dtype), x.ndim)
    return y


def _torch_fwd(x: Tensor, bias: Tensor | None) -> Tensor:
    y = _pre(x, bias)
    # y is a fresh buffer when a bias was added or x was upcast: work in place, one allocation
    out = F.silu(y, inplace=True) if y is not x else F.silu(x)
    return _like(out.mul_(SCALE), x)


def _torch_bwd(grad: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    y = _pre(x, bias)
    return _like(torch.ops.aten.silu_backward(grad.to(y.dtype), y).mul_(SCALE), x)


def _silu2(y: Tensor) -> Tensor:
    s = torch.sigmoid(y)
    return s * (1 - s) * (2 + y * (1 - 2 * s))


def _silu3(y: Tensor) -> Tensor:
    s = torch.sigmoid(y)
    return s * (1 - s) * (3 * (1 - 2 * s) + y * (1 - 6 * s + 6 * s * s))


def _torch_bwd2(gg: Tensor, grad: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    y = _pre(x, bias)
    return _like((gg.to(y.dtype) * grad.to(y.dtype) * _silu2(y)).mul_(SCALE), x)


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("vaebm::swish", mutates_args=())
def _swish_op(x: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    return _run("swish_fwd", backend, x, [x], bias, _torch_fwd)


@torch.library.custom_op("vaebm::swish_backward", mutates_args=())
def _swish_bwd_op(grad: Tensor, x: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    return _run("swish_bwd", backend, x, [grad, x], bias, _torch_bwd)


@torch.library.custom_op("vaebm::swish_backward2", mutates_args=())
def _swish_bwd2_op(gg: Tensor, grad: Tensor, x: Tensor, bias: Optional[Tensor],
                   backend: str) -> Tensor:
    return _run("swish_bwd2", backend, x, [gg, grad, x], bias, _torch_bwd2)


@_swish_op.register_fake
def _(x, bias, backend):
    return torch.empty_like(x)


@_swish_bwd_op.register_fake
def _(grad, x, bias, backend):
    return torch.empty_like(x)


@_swish_bwd2_op.register_fake
def _(gg, grad, x, bias, backend):
    return torch.empty_like(x)


def _bias_grad(g: Tensor, bias: Tensor) -> Tensor:
    dims = [d for d in range(g.ndim) if d != 1]
    return g.sum(dims, dtype=torch.promote_types(g.dtype, torch.float32)).to(bias.dtype)


def _setup(ctx, inputs, output):
    ctx.bias_none = inputs[-2] is None
    ctx.backend = inputs[-1]
    ctx.save_for_backward(*[t for t in inputs[:-1] if t is not None])


def _unpack(ctx):
    saved = list(ctx.saved_tensors)
    return saved + [None] if ctx.bias_none else saved


def _swish_grad(ctx, go):
    x, bias = _unpack(ctx)
    gy = torch.ops.vaebm.swish_backward(go, x, bias, ctx.backend)
    gb = _bias_grad(gy, bias) if bias is not None and ctx.needs_input_grad[1] else None
    return gy, gb, None


def _swish_bwd_grad(ctx, go):
    # d/dgrad [grad * f'(y)] = go * f'(y): the same op again; d/dy = go * grad * f''(y)
    grad, x, bias = _unpack(ctx)
    g_grad = g_x = None
    if ctx.needs_input_grad[0]:
        g_grad = torch.ops.vaebm.swish_backward(go, x, bias, ctx.backend)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        g_x = torch.ops.vaebm.swish_backward2(go, grad, x, bias, ctx.backend)
    g_b = _bias_grad(g_x, bias) if bias is not None and ctx.needs_input_grad[2] else None
    return g_grad, g_x, g_b, None


def _swish_bwd2_grad(ctx, go):
    # out = gg * grad * f''(y); plain PyTorch, so autograd goes on to any order from here
    gg, grad, x, bias = _unpack(ctx)
    y = _pre(x, bias)
    f2 = _silu2(y) * SCALE
    go = go.to(y.dtype)
    g_gg = (go * grad.to(y.dtype) * f2).to(gg.dtype)
    g_grad = (go * gg.to(y.dtype) * f2).to(grad.dtype)
    g_y = go * gg.to(y.dtype) * grad.to(y.dtype) * _silu3(y) * SCALE
    g_b = _bias_grad(g_y, bias) if bias is not None and ctx.needs_input_grad[3] else None
    return g_gg, g_grad, g_y.to(x.dtype), g_b, None


_swish_op.register_autograd(_swish_grad, setup_context=_setup)
_swish_bwd_op.register_autograd(_swish_bwd_grad, setup_context=_setup)
_swish_bwd2_op.register_autograd(_swish_bwd2_grad, setup_context=_setup)


# ------------------------------------------------------------------ public entry point
def swish(x: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """silu(x + bias[c]) / 1.1 with a differentiable backward. x (B, C, ...), bias (C,) or None;
    returns x's shape, dtype and strides. ``backend``: None/``"auto"``/``"torch"``/``"cpp"``/...
    (explicit argument > ``use_backend`` > ``VAEBM_BACKEND`` > auto, resolved when the op runs).
    """
    if not x.is_floating_point():
        raise TypeError(f"swish expects a floating-point tensor, got {x.dtype}")
    if bias is not None:
        if x.ndim < 2 or bias.shape != (x.shape[1],):
            raise ValueError(f"bias must have shape ({x.shape[1] if x.ndim > 1 else 'C'},) to "
                             f"broadcast over dim 1 of x {tuple(x.shape)}, got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if backend is not None:
        _registry._check_name(backend)
    return torch.ops.vaebm.swish(x, bias, backend or "")
