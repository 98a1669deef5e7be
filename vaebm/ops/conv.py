"""Frozen-weight CPU convolutions of the NVAE decoder's hot path: 1x1 convs routed to oneDNN in
both directions, and stride-1 depthwise convs on a C++ kernel (csrc/cpu/dwconv_cpu.cpp).

Why: PyTorch picks its CPU convolution kernel by a heuristic that sends a 1x1, stride-1 conv to
the im2col "slow_conv2d" path when one intra-op thread is used and the batch is under 16
(``ConvParams::use_mkldnn``), for the forward and again for the input gradient. On the NVAE
decoder those convs (the inverted-residual expand/project layers) are most of the FLOPs of a
Langevin step, and oneDNN runs them about 1.4x faster on the AVX-512 machine we measured
(2.2 -> 1.6 ms for 128->768 channels at 16x16, batch 2, forward plus input gradient).

:func:`conv1x1` is the fast path; :func:`conv1x1_ref` (``F.conv2d``) is its specification. The
weight is frozen (no weight gradient): the input gradient of ``y = W x + b`` is ``W^T g``, itself
a 1x1 conv with the transposed weight, which the caller caches once (``weight_t``).

Depthwise: :func:`depthwise` (spec :func:`depthwise_ref`) runs the 5x5 depthwise convs of the
decoder cells; stride 1 makes its input gradient the same conv with the kernel flipped, so one
kernel serves both directions. Measured on one thread: about 20% less time than oneDNN in the
depthwise convs of a cifar10 step (16x16 planes; 0-3% of the whole step), 8% of a celeba64
step, 6x on (2, 768, 32, 32). It is used when the cpp backend is wanted (``auto`` or ``cpp``)
and its extension builds.

Dtypes of the 1x1 path: float32, and bfloat16 (explicitly, or under CPU autocast, which casts
input and weight to bf16 as autocast's conv2d would) where oneDNN has a bf16 path on this CPU
(AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on AVX2-only CPUs bf16 calls go to ``F.conv2d``). Anything
else (CUDA tensors, float64, strides, groups) is not served here: :func:`supported` says which
calls are.

Chosen by measurement, not by the machine we tuned on: a kernel that wins on one CPU loses on
another (the depthwise kernel is 5x faster than oneDNN on 16x16 planes with AVX-512, and lost
2x on an AVX2-only EPYC before its AVX2 variant was rewritten; at 7x7 planes oneDNN wins
everywhere). :func:`prefer` times the fast path against ``F.conv2d`` on the call's own shapes the
first time it sees them (forward, plus input gradient when one is needed) and caches the
answer per shape, dtype, layout and thread count. ``VAEBM_CPU_CONV=kernel`` forces the fast
paths wherever they apply, ``VAEBM_CPU_CONV=torch`` never takes them, ``auto`` (default)
measures.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _registry

log = logging.getLogger("vaebm")

DTYPES = (torch.float32, torch.bfloat16)
_ZERO, _ONE = [0, 0], [1, 1]


def conv1x1_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: ``F.conv2d(x, weight, bias)``; x (B, C_in, H, W), weight (C_out, C_in, 1, 1)."""
    return F.conv2d(x, weight, bias)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


_BF16: list = []


def bf16_ok() -> bool:
    """oneDNN can run bf16 convolutions on this CPU (it refuses without AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT, and honours ``ONEDNN_MAX_CPU_ISA``). Asked once per process."""
    if not _BF16:
        fn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            _BF16.append(bool(fn()) if fn is not None else False)
        except Exception:  # an op that exists but cannot answer: do not risk the crash
            _BF16.append(False)
    return _BF16[0]


def supported(x: Tensor, weight: Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
              groups: int = 1) -> bool:
    """True when :func:`conv1x1` serves this call: CPU, a 1x1 kernel with stride 1, no padding
    or dilation, one group, a 4-D input of a served dtype (after autocast), and a weight that
    needs no gradient."""
    if x.device.type != "cpu" or x.dim() != 4 or weight.requires_grad:
        return False
    if tuple(weight.shape[2:]) != (1, 1) or groups != 1:
        return False
    if tuple(stride) != (1, 1) or tuple(padding) != (0, 0) or tuple(dilation) != (1, 1):
        return False
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dt == torch.bfloat16 or x.dtype == torch.bfloat16:
        if not bf16_ok():
            return False
    return dt in DTYPES and x.dtype in (torch.float32, torch.bfloat16) and available()


# ----------------------------------------------------------------------------- measured choice
_CHOICE: dict = {}
_MARGIN = 0.9  # the fast path must save at least 10% of the plain call to be taken


def policy() -> str:
    """``VAEBM_CPU_CONV``: ``auto`` (measure, default), ``kernel`` (always), ``torch`` (never)."""
    v = os.environ.get("VAEBM_CPU_CONV", "auto").strip().lower() or "auto"
    if v not in ("auto", "kernel", "torch"):
        raise ValueError(f"VAEBM_CPU_CONV must be auto, kernel or torch, got {v!r}")
    return v


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]


def _time_pair(fast, plain, x: Tensor, need_grad: bool, reps: int = 5):
    """Median milliseconds of ``fast(x)`` and ``plain(x)`` (with the input gradient of a random
    cotangent when ``need_grad``), interleaved so that machine noise hits both alike."""
    # a private generator: timing must not advance the global RNG a training run is seeded by
    g = torch.Generator().manual_seed(0)
    xx = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype).contiguous(
        memory_format=_format(x))

    def run(f):
        def go():
            if need_grad:
                with torch.enable_grad():
                    xi = xx.detach().requires_grad_(True)
                    y = f(xi)
                    torch.autograd.grad(y, xi, torch.ones_like(y))
            else:
                with torch.no_grad():
                    f(xx)
        return go

    a, b = run(fast), run(plain)
    a(), b()  # warm-up: first-touch allocations, oneDNN primitive creation
    ta, tb = [], []
    for _ in range(reps):
        ta.append(_median_ms(a, 1))
        tb.append(_median_ms(b, 1))
    ta.sort(), tb.sort()
    return ta[reps // 2], tb[reps // 2]


def prefer(kind: str, x: Tensor, fast, plain, sig: tuple = ()) -> bool:
    """Whether to take the fast path ``fast`` (a function of x) over ``plain`` (``F.conv2d``
    with the same arguments) for this call. Under ``VAEBM_CPU_CONV=auto`` the two are timed on
    the first call of each (kind, shapes, dtype, layout, autocast, threads, gradient) and the
    answer is cached for the process; ties go to the plain path. ``sig`` adds what else tells
    calls apart (the weight's shape, the padding)."""
    pol = policy()
    if pol != "auto":
        return pol == "kernel"
    if torch.compiler.is_compiling():
        return False
    need_grad = x.requires_grad and torch.is_grad_enabled()
    ac = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    key = (kind, tuple(x.shape), sig, x.dtype, _format(x), ac, torch.get_num_threads(), need_grad)
    hit = _CHOICE.get(key)
    if hit is None:
        t_fast, t_plain = _time_pair(fast, plain, x, need_grad)
        hit = _CHOICE[key] = t_fast < _MARGIN * t_plain
        log.debug("vaebm.ops.conv: %s %s: kernel %.3f ms, F.conv2d %.3f ms -> %s", kind,
                  tuple(x.shape), t_fast, t_plain, "kernel" if hit else "F.conv2d")
    return hit


def choices() -> dict:
    """The cached decisions: {(kind, shape, sig, dtype, layout, autocast, threads, grad): bool}."""
    return dict(_CHOICE)


class _Conv1x1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_t, bias):
        ctx.weight_t = weight_t
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, _ZERO, _ONE, _ONE, 1)

    @staticmethod
    def backward(ctx, grad):
        gx = None
        if ctx.needs_input_grad[0]:
            wt = ctx.weight_t.to(grad.dtype)
            gx = torch.ops.aten.mkldnn_convolution(grad.contiguous(
                memory_format=_format(grad)), wt, None, _ZERO, _ONE, _ONE, 1)
        return gx, None, None, None


def _format(t: Tensor):
    return torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last)
                                   and not t.is_contiguous()) else torch.contiguous_format


def transpose_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in, 1, 1) -> (C_in, C_out, 1, 1), contiguous: the input-gradient conv's weight."""
    return weight.detach().transpose(0, 1).contiguous()


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None,
            weight_t: Tensor | None = None, *, check: bool = True) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a frozen 1x1 weight, forward and input gradient by
    oneDNN. x (B, C_in, H, W) float32/bfloat16 on the CPU (contiguous or channels_last);
    weight (C_out, C_in, 1, 1) not requiring grad; bias (C_out,) or None; ``weight_t`` the
    cached :func:`transpose_weight` (computed here if None). Under CPU autocast, input, weight
    and bias are cast to the autocast dtype first (the output then has that dtype, like
    autocast's conv2d). Raises ValueError for calls :func:`supported` rejects; ``check=False``
    skips that test for a caller that has just made it (the per-call hot path)."""
    if check and not supported(x, weight):
        raise ValueError(
            f"conv1x1: unsupported call (x {tuple(x.shape)} {x.dtype} on {x.device}, weight "
            f"{tuple(weight.shape)}, requires_grad={weight.requires_grad}); it serves frozen "
            f"1x1 stride-1 convs of float32/bfloat16 CPU tensors with oneDNN available")
    if check and weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv1x1: x has {x.shape[1]} channels, weight expects {weight.shape[1]}")
    if weight_t is None:
        weight_t = transpose_weight(weight)
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return _apply(x.to(dt), weight.to(dt), weight_t.to(dt),
                          None if bias is None else bias.to(dt))
    dt = x.dtype
    return _apply(x, weight.to(dt), weight_t.to(dt), None if bias is None else bias.to(dt))


def _apply(x, w, wt, b):
    if x.requires_grad and torch.is_grad_enabled():
        return _Conv1x1.apply(x, w, wt, b)
    return torch.ops.aten.mkldnn_convolution(x, w, b, _ZERO, _ONE, _ONE, 1)


# ----------------------------------------------------------------------------- depthwise
def depthwise_ref(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """Reference: ``F.conv2d(x, weight, bias, 1, padding, 1, C)``; weight (C, 1, K, K)."""
    return F.conv2d(x, weight, bias, 1, padding, 1, x.shape[1])


def _depthwise_call_ok(x: Tensor, weight: Tensor, stride, padding, dilation, groups) -> bool:
    """float32 CPU tensors without autocast, an NCHW-contiguous 4-D input, a (C, 1, K, K)
    weight with groups = C, square odd K, stride 1, no dilation, equal paddings below K, and
    the C++ kernel wanted and built (what both depthwise paths need)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if torch.is_autocast_enabled("cpu") or not x.is_contiguous():
        return False
    C, K = x.shape[1], weight.shape[-1]
    if groups != C or tuple(weight.shape) != (C, 1, K, K) or weight.dtype != torch.float32:
        return False
    p = tuple(padding) if not isinstance(padding, int) else (padding, padding)
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or p[0] != p[1] or p[0] >= K:
        return False
    return K % 2 == 1 and _kernel_ok()


def depthwise_supported(x: Tensor, weight: Tensor, stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1), groups: int = 1) -> bool:
    """True when :func:`depthwise` serves the call: float32 CPU tensors without autocast, an
    NCHW-contiguous input, a frozen (C, 1, K, K) weight with groups = C, square odd K, stride 1,
    no dilation, equal paddings below K. The C++ kernel is built on first use."""
    return (not weight.requires_grad
            and _depthwise_call_ok(x, weight, stride, padding, dilation, groups))


# backend -> kernel (vaebm::dwconv2d / dwconv2d_wgrad, declared in _library; C++ CPU only)
DWCONV = {"cpp": _registry.Kernel("cpu_nn", "dwconv2d", (torch.float32,))}
DWCONV_WGRAD = {"cpp": _registry.Kernel("cpu_nn", "dwconv2d_wgrad", (torch.float32,))}
_KERNEL: list = []  # [True/False] once the C++ extension was tried


def _kernel_ok() -> bool:
    """The cpp backend is wanted (``use_backend``/``VAEBM_BACKEND`` auto or cpp) and its
    extension builds; a build failure is logged once and the caller falls back to F.conv2d."""
    if _registry.requested_backend() not in ("auto", "cpp"):
        return False
    if not _KERNEL:
        try:
            _KERNEL.append(_registry.resolve_op(DWCONV, torch.device("cpu"), torch.float32,
                                                "cpp")[0] == "cpp")
        except _registry.BackendUnavailable as e:  # no compiler, ...: F.conv2d still works
            log.warning("vaebm: depthwise conv kernel unavailable, using F.conv2d: %s", e)
            _KERNEL.append(False)
    return _KERNEL[0]


def _dw(x, w, bias, pad):
    return torch.ops.vaebm.dwconv2d(x, w, bias, int(pad))


def _dw_wgrad(x, g, k, pad):
    return torch.ops.vaebm.dwconv2d_wgrad(x, g, int(k), int(pad))


class _Depthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_flip, bias, pad):
        ctx.weight_flip, ctx.pad, ctx.k = weight_flip, pad, weight.shape[-1]
        return _dw(x, weight, bias, pad)

    @staticmethod
    def backward(ctx, grad):
        gx = None
        if ctx.needs_input_grad[0]:
            # stride 1: d/dx of the conv is the same conv of grad with the flipped kernel
            gx = _dw(grad.contiguous(), ctx.weight_flip, None, ctx.k - 1 - ctx.pad)
        return gx, None, None, None, None


def flip_weight(weight: Tensor) -> Tensor:
    """(C, 1, K, K) -> the same kernels rotated by 180 degrees (the input-gradient conv's)."""
    return weight.detach().flip(-1, -2).contiguous()


def depthwise(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int,
              weight_flip: Tensor | None = None, *, check: bool = True) -> Tensor:
    """Depthwise stride-1 conv of a frozen weight by the C++ kernel (csrc/cpu/dwconv_cpu.cpp),
    forward and input gradient (the backward is not differentiable again). x (B, C, H, W)
    float32 contiguous; weight (C, 1, K, K); bias (C,) or None; ``weight_flip`` the cached
    :func:`flip_weight`. Raises ValueError for calls :func:`depthwise_supported` rejects;
    ``check=False`` skips that test for a caller that has just made it."""
    if check and not depthwise_supported(x, weight, padding=(padding, padding), groups=x.shape[1]):
        raise ValueError(
            f"depthwise: unsupported call (x {tuple(x.shape)} {x.dtype} on {x.device}, "
            f"contiguous={x.is_contiguous()}, weight {tuple(weight.shape)}, padding {padding}); "
            "it serves frozen stride-1 (C, 1, K, K) convs of contiguous float32 CPU tensors")
    if weight_flip is None:
        weight_flip = flip_weight(weight)
    b = None if bias is None else bias.detach().float().contiguous()
    if x.requires_grad and torch.is_grad_enabled():
        return _Depthwise.apply(x, weight.contiguous(), weight_flip, b, int(padding))
    return _dw(x, weight.contiguous(), b, padding)


# ----------------------------------------------------------------------------- depthwise, training
def depthwise_train_supported(x: Tensor, weight: Tensor, bias: Tensor | None, stride=(1, 1),
                              padding=(0, 0), dilation=(1, 1), groups: int = 1) -> bool:
    """True when :func:`depthwise_train` serves the call: as :func:`depthwise_supported` but
    for a weight that needs its gradient (stage-1 training), no bias, K <= 15."""
    return (bias is None and weight.shape[-1] <= 15
            and _depthwise_call_ok(x, weight, stride, padding, dilation, groups))


class _DepthwiseTrain(torch.autograd.Function):
    """Stride-1 depthwise conv with both gradients on the C++ kernels: d/dx is the same conv
    of the output gradient with the flipped kernel; d/dw is ``dwconv2d_wgrad``."""

    @staticmethod
    def forward(ctx, x, weight, pad):
        ctx.save_for_backward(x, weight)
        ctx.pad = pad
        return _dw(x, weight, None, pad)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        k, pad = w.shape[-1], ctx.pad
        grad = grad.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _dw(grad, w.flip(-1, -2).contiguous(), None, k - 1 - pad)
        if ctx.needs_input_grad[1]:
            gw = _dw_wgrad(x, grad, k, pad)
        return gx, gw, None


def depthwise_train(x: Tensor, weight: Tensor, padding: int, *, check: bool = True) -> Tensor:
    """``F.conv2d(x, weight, None, 1, padding, 1, C)`` with the input and weight gradients on
    the C++ kernels (once differentiable). x (B, C, H, W) float32 contiguous; weight (C, 1, K, K)
    (it may require grad). Raises ValueError for calls :func:`depthwise_train_supported`
    rejects."""
    if check and not depthwise_train_supported(x, weight, None, padding=(padding, padding),
                                               groups=x.shape[1]):
        raise ValueError(
            f"depthwise_train: unsupported call (x {tuple(x.shape)} {x.dtype} on {x.device}, "
            f"weight {tuple(weight.shape)}, padding {padding}); it serves stride-1 "
            "(C, 1, K, K) convs of contiguous float32 CPU tensors, K odd <= 15, no bias")
    return _DepthwiseTrain.apply(x, weight.contiguous(), int(padding))
