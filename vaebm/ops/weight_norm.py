"""Weight-norm reparameterisation of all output channels of a layer in one op.

Maths (Salimans & Kingma 2016, with the log-scale parameter of the VAEBM/NVAE convs), per output
channel o, v_o = v[o].flatten(), n_o = ||v_o||, g_o = exp(log_g[o]):

    w[o]          = g_o * v[o] / n_o
    dL/dv[o]      = (g_o / n_o) * (G[o] - <G[o], v_o / n_o> * v_o / n_o)        (G = dL/dw)
    dL/dlog_g[o]  = g_o * <G[o], v_o / n_o> = <G[o], w[o]>

Custom ops: ``vaebm::weight_norm(v, log_g, backend) -> w`` and
``vaebm::weight_norm_backward(grad_w, v, log_g, backend) -> (grad_v, grad_log_g)``; the second
derivative is autograd through :func:`_torch_bwd` (plain PyTorch), so double backward works.

Backend seam: a backend module serves weight norm by defining ``weight_norm_fwd(v, log_g)`` and
``weight_norm_bwd(grad_w, v, log_g)`` with the semantics of :func:`_torch_fwd` and
:func:`_torch_bwd` on contiguous v, grad_w (C_out, ...) of one dtype (fp32/fp16/bf16) and a
contiguous log_g (C_out,); internal maths in fp32. ``auto`` skips modules that lack them.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _registry
from ._registry import Kernel
from .swish import CPU_DTYPES, KERNEL_DTYPES, LOW_PRECISION

EPS = 1e-12  # keeps an all-zero row finite; far below any norm a trained layer reaches


def weight_norm_ref(v: Tensor, log_g: Tensor) -> Tensor:
    """Reference: exp(log_g)[o] * v[o] / ||v[o]||. v (C_out, ...) , log_g (C_out,) -> like v."""
    vf = v.float() if v.dtype in LOW_PRECISION else v
    norm = vf.flatten(1).norm(dim=1).clamp_min(EPS)
    scale = torch.exp(log_g.to(vf.dtype)) / norm
    return (vf * scale.view(-1, *([1] * (v.ndim - 1)))).to(v.dtype)


def _compute(v: Tensor, log_g: Tensor):
    vf = v.float() if v.dtype in LOW_PRECISION else v
    rows = vf.reshape(vf.shape[0], -1)
    norm = rows.norm(dim=1).clamp_min(EPS)
    return rows, norm, torch.exp(log_g.to(vf.dtype))


def _torch_fwd(v: Tensor, log_g: Tensor) -> Tensor:
    rows, norm, g = _compute(v, log_g)
    return (rows * (g / norm)[:, None]).to(v.dtype).view(v.shape)


def _torch_bwd(grad_w: Tensor, v: Tensor, log_g: Tensor) -> Tuple[Tensor, Tensor]:
    rows, norm, g = _compute(v, log_g)
    G = grad_w.reshape(rows.shape).to(rows.dtype)
    vhat = rows / norm[:, None]
    proj = (G * vhat).sum(1)  # <G, v/||v||> per row
    grad_v = (g / norm)[:, None] * (G - proj[:, None] * vhat)
    return grad_v.to(v.dtype).view(v.shape), (g * proj).to(log_g.dtype)


# backend -> kernel (vaebm::weight_norm_fwd / _bwd, declared in _library); spec: _torch_fwd/_bwd
WEIGHT_NORM = {fn: {"cpp": Kernel("cpu_nn", fn, CPU_DTYPES),
                    "cuda": Kernel("cuda_nn", fn, KERNEL_DTYPES),
                    "triton": Kernel("triton", "triton_" + fn, KERNEL_DTYPES)}
               for fn in ("weight_norm_fwd", "weight_norm_bwd")}


def _run(fn, backend, tensors, torch_impl):
    v = tensors[1] if fn == "weight_norm_bwd" else tensors[0]
    name, kernel = _registry.resolve_op(WEIGHT_NORM[fn], v.device, v.dtype, backend or None)
    if kernel is None:
        return torch_impl(*tensors)
    return kernel(*[t.contiguous() for t in tensors])


@torch.library.custom_op("vaebm::weight_norm", mutates_args=())
def _wn_op(v: Tensor, log_g: Tensor, backend: str) -> Tensor:
    return _run("weight_norm_fwd", backend, [v, log_g], _torch_fwd).view(v.shape)


@torch.library.custom_op("vaebm::weight_norm_backward", mutates_args=())
def _wn_bwd_op(grad_w: Tensor, v: Tensor, log_g: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    gv, gg = _run("weight_norm_bwd", backend, [grad_w, v, log_g], _torch_bwd)
    return gv.view(v.shape), gg


@_wn_op.register_fake
def _(v, log_g, backend):
    return v.new_empty(v.shape)


@_wn_bwd_op.register_fake
def _(grad_w, v, log_g, backend):
    return v.new_empty(v.shape), log_g.new_empty(log_g.shape)


def _setup(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(*inputs[:-1])


def _wn_grad(ctx, go):
    v, log_g = ctx.saved_tensors
    gv, gg = torch.ops.vaebm.weight_norm_backward(go.contiguous(), v, log_g, ctx.backend)
    return gv, gg, None


def _wn_bwd_grad(ctx, go_v, go_g):
    # vjp of the PyTorch backward formula; torch.func composes with the outer autograd, so the
    # result stays differentiable when create_graph asks for it
    grad_w, v, log_g = ctx.saved_tensors
    go_v = torch.zeros_like(v) if go_v is None else go_v
    go_g = torch.zeros_like(log_g) if go_g is None else go_g
    _, vjp = torch.func.vjp(_torch_bwd, grad_w, v, log_g)
    return (*vjp((go_v, go_g)), None)


_wn_op.register_autograd(_wn_grad, setup_context=_setup)
_wn_bwd_op.register_autograd(_wn_bwd_grad, setup_context=_setup)


def weight_norm(v: Tensor, log_g: Tensor, *, backend: str | None = None) -> Tensor:
    """w = exp(log_g)[o] * v[o] / ||v[o]|| for every output channel o, differentiable twice.

    v (C_out, C_in, kH, kW) or any (C_out, ...), log_g (C_out,) -> w like v (contiguous).
    ``backend`` follows the rule of :func:`vaebm.ops.swish.swish`.
    """
    if not v.is_floating_point():
        raise TypeError(f"weight_norm expects a floating-point v, got {v.dtype}")
    if v.ndim < 2 or log_g.shape != (v.shape[0],):
        raise ValueError(f"weight_norm needs v (C_out, ...) with ndim >= 2 and log_g (C_out,); "
                         f"got v {tuple(v.shape)}, log_g {tuple(log_g.shape)}")
    if backend is not None:
        _registry._check_name(backend)
    return torch.ops.vaebm.weight_norm(v, log_g, backend or "")
