"""Building blocks of the energy networks: Swish, weight-normalised conv, residual block.

Every conv is weight-normalised, w = exp(log_g) * v / ||v|| per output channel, with the
data-dependent initialisation of Salimans & Kingma (2016): :func:`data_init` sets log_g and the
bias so that, over the initialisation batches, each output channel has mean 0 and standard
deviation 0.2. The ``initialised`` flag is a buffer, so a loaded checkpoint is never
re-initialised (the published code's flag was not saved). Spectral norms of the normalised weights
(reshaped C_out x C_in*k*k) come from power iteration with persistent u/v buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.swish import swish
from ..ops.weight_norm import weight_norm

INIT_STD = 0.2
SN_ITERS, SN_ITERS_FIRST = 4, 40


class Swish(nn.Module):
    """silu(x + bias[c]) / 1.1 (1-Lipschitz). x (B, C, ...), bias (C,) or None -> like x."""

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return swish(x, bias)


class _StopForward(Exception):
    """Raised by a conv collecting init statistics: nothing after it needs to run."""


class WNConv2d(nn.Module):
    """Weight-normalised 2-D conv, (B, C_in, H, W) -> (B, C_out, H', W'); ``padding`` k//2.

    Parameters ``weight_v`` (C_out, C_in, k, k), ``log_g`` (C_out,), ``bias`` (C_out,) or None.
    Buffers ``initialised`` (bool), ``sn_u`` (C_out,), ``sn_v`` (C_in*k*k,).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, bias: bool = True):
        super().__init__()
        k = kernel_size
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding = stride, k // 2 if padding is None else padding
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels, k, k))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Conv2d's default
        # log_g = log ||v|| makes w == v until data_init rescales it
        self.log_g = nn.Parameter(self.weight_v.detach().flatten(1).norm(dim=1).log())
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("sn_u", torch.zeros(out_channels))
        self.register_buffer("sn_v", torch.zeros(in_channels * k * k))
        self._collect: list | None = None   # running (sum, sum of squares, count) during init
        self._in_init = False                # data_init running: callers take the plain path
        self._frozen: dict | None = None     # cached weights in sampling mode
        self._sn_warm = False                # u/v hold a converged estimate

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")

    # ---------------------------------------------------------------- weights
    def weight(self) -> Tensor:
        """Normalised weight (C_out, C_in, k, k); the cached copy when frozen."""
        if self._frozen is not None:
            return self._cached("w")
        return weight_norm(self.weight_v, self.log_g)

    def pooled_weight(self) -> Tensor:
        """(C_out, C_in, 4, 4) kernel K with conv(x, K, stride 2, pad 1) == avg_pool2d(conv(x, w,
        pad 1), 2) for a 3x3 stride-1 conv: the pool folded into the conv, 2.25x fewer MACs."""
        if self._frozen is not None:
            return self._cached("w4")
        return _pool_kernel(self.weight())

    def _bias(self) -> Tensor | None:
        if self.bias is None or self._frozen is None:
            return self.bias
        return self._frozen["b"]

    def _cached(self, key: str) -> Tensor:
        w = self._frozen[key]
        dev = w.device.type
        if torch.is_autocast_enabled(dev):  # cast once per dtype instead of at every conv call
            dt = torch.get_autocast_dtype(dev)
            if dt != w.dtype:
                casts = self._frozen.setdefault("casts", {})
                if (key, dt) not in casts:
                    casts[key, dt] = w.to(dt)
                return casts[key, dt]
        return w

    def freeze(self, channels_last: bool = False) -> None:
        """Cache the normalised weight (detached) for sampling; stale if parameters change."""
        with torch.no_grad():
            w = weight_norm(self.weight_v, self.log_g)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            cache = {"w": w.contiguous(memory_format=fmt),
                     "b": None if self.bias is None else self.bias.detach().clone()}
            if self.kernel_size == 3 and self.stride == 1 and self.padding == 1:
                cache["w4"] = _pool_kernel(w).contiguous(memory_format=fmt)
        self._frozen = cache

    def unfreeze(self) -> None:
        self._frozen = None

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, *, act: bool = False, add_bias: bool = True) -> Tensor:
        """conv(x) + bias; ``act``: swish(conv(x) + bias) fused; ``add_bias=False``: no bias (the
        caller adds ``self.bias`` later, e.g. inside a fused swish)."""
        if self._collect is not None:
            self._accumulate(x)
        y = F.conv2d(x, self.weight(), None, self.stride, self.padding)
        b = self._bias() if add_bias else None
        if act:
            return swish(y, b)
        return y if b is None else y + b.to(y.dtype).view(1, -1, 1, 1)

    def forward_pooled(self, x: Tensor) -> Tensor:
        """avg_pool2d(conv(x), 2) without bias, as one stride-2 4x4 conv. (B, C_in, H, W) ->
        (B, C_out, H//2, W//2)."""
        return F.conv2d(x, self.pooled_weight(), None, 2, 1)

    # ---------------------------------------------------------------- data-dependent init
    @property
    def in_init(self) -> bool:
        """True while :func:`data_init` runs: callers must run this conv on its plain input
        (no pool folded into it) so it is hooked, ordered and measured as the spec defines it."""
        return self._in_init

    def _accumulate(self, x: Tensor) -> None:
        w = weight_norm(self.weight_v, torch.zeros_like(self.log_g))  # unit-norm rows, g = 1
        y = F.conv2d(x, w, None, self.stride, self.padding).double()
        s = self._collect
        s[0] += y.sum((0, 2, 3))
        s[1] += y.square().sum((0, 2, 3))
        s[2] += y.numel() / y.shape[1]
        raise _StopForward

    def _begin_init(self) -> None:
        if self._frozen is not None:
            raise RuntimeError("data_init on a frozen module: unfreeze() it first")
        z = torch.zeros(self.out_channels, dtype=torch.float64, device=self.weight_v.device)
        self._collect = [z, z.clone(), torch.zeros((), dtype=torch.float64, device=z.device)]

    @torch.no_grad()
    def _end_init(self, std: float = INIT_STD) -> None:
        total, sq, n = self._collect
        self._collect = None
        stats = torch.cat([total, sq, n.view(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)  # every rank ends with the same parameters
        c = self.out_channels
        n = stats[-1]
        if n == 0:
            raise RuntimeError("data_init saw no data for a conv layer")
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(1e-12)
        scale = std / var.sqrt()  # g with unit-norm rows; output (y - mean) * scale
        self.log_g.copy_(scale.log().to(self.log_g.dtype))
        if self.bias is not None:  # a bias-free conv keeps its mean; only its spread is set
            self.bias.copy_((-mean * scale).to(self.bias.dtype))
        self.initialised.fill_(True)
        self._sn_warm = False  # the rows were rescaled: u/v need the long warm-up again

    # ---------------------------------------------------------------- spectral norm
    def spectral_norm(self, n_iter: int | None = None) -> Tensor:
        """Largest singular value of the normalised weight as (C_out, C_in*k*k), a 0-d tensor
        differentiable w.r.t. ``weight_v`` and ``log_g`` (d sigma = u^T dW v, Miyato et al.).
        Runs ``n_iter`` power iterations (default 4; 40 at first use), updating u/v in place."""
        w = weight_norm(self.weight_v, self.log_g).flatten(1)
        with torch.no_grad():
            wd = w.detach().float()
            if self._sn_warm:
                u, v, n = self.sn_u.float(), self.sn_v.float(), SN_ITERS
            else:
                u = F.normalize(torch.randn(wd.shape[0], device=wd.device), dim=0)
                v = F.normalize(torch.randn(wd.shape[1], device=wd.device), dim=0)
                n = SN_ITERS_FIRST
            for _ in range(n if n_iter is None else n_iter):
                v = F.normalize(wd.t() @ u, dim=0, eps=1e-12)
                u = F.normalize(wd @ v, dim=0, eps=1e-12)
            self.sn_u.copy_(u)
            self.sn_v.copy_(v)
            self._sn_warm = True
        return u @ (w.float() @ v)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "sn_u" in state_dict and not self.sn_u.is_meta:
            self._sn_warm = bool(self.sn_u.abs().sum() > 0)  # one sync, at load time only
        self._frozen = None


def _pool_kernel(w: Tensor) -> Tensor:
    """(O, I, 3, 3) -> (O, I, 4, 4): w convolved with the 2x2 box filter / 4 (see pooled_weight)."""
    return 0.25 * (F.pad(w, (0, 1, 0, 1)) + F.pad(w, (1, 0, 0, 1))
                   + F.pad(w, (0, 1, 1, 0)) + F.pad(w, (1, 0, 1, 0)))


class ResBlock(nn.Module):
    """conv3x3(+b) -> swish -> conv3x3(+b), plus a skip (identity, or 1x1 conv without bias when
    the channels change or the block downsamples); after the sum a 2x2 average pool if ``down``,
    then swish. (B, C_in, H, W) -> (B, C_out, H', W') with H' = H // 2 if down else H.

    Computed as swish(pool(conv2_nobias(h) + skip(x)) + b2): the bias commutes with the pool, and
    on down blocks pool∘conv3x3 is one stride-2 4x4 conv and pool∘skip == skip∘pool.
    """

    def __init__(self, in_channels: int, out_channels: int, down: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.down = in_channels, out_channels, down
        self.conv1 = WNConv2d(in_channels, out_channels, 3)
        self.conv2 = WNConv2d(out_channels, out_channels, 3)
        self.skip = (WNConv2d(in_channels, out_channels, 1, bias=False)
                     if down or in_channels != out_channels else None)

    def extra_repr(self) -> str:
        return f"down={self.down}"

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x, act=True)
        # during init the convs must see their plain full-resolution inputs and outputs
        plain = not self.down or self.conv2.in_init or self.skip.in_init
        if plain:
            y = self.conv2(h, add_bias=False)
            y = y + (x if self.skip is None else self.skip(x))
            if self.down:
                y = F.avg_pool2d(y, 2)
        else:
            y = self.conv2.forward_pooled(h) + self.skip(F.avg_pool2d(x, 2))
        return swish(y, self.conv2._bias())


def wn_convs(module: nn.Module) -> list[WNConv2d]:
    return [m for m in module.modules() if isinstance(m, WNConv2d)]


@torch.no_grad()
def data_init(model: nn.Module, batches, *, forward=None, std: float = INIT_STD,
              force: bool = False) -> int:
    """Data-dependent init of every :class:`WNConv2d` in ``model`` not yet initialised (all if
    ``force``): layer by layer in forward order, statistics accumulated over all ``batches``
    (a list of inputs to ``forward``, default ``model``) and summed over ranks when a process
    group exists. Returns the number of layers initialised (0 after loading a checkpoint).
    Every rank must pass the same number of layers, i.e. call this collectively.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("data_init needs at least one batch")
    forward = model if forward is None else forward
    todo = [m for m in wn_convs(model) if force or not bool(m.initialised)]
    if not todo:
        return 0
    order: list[WNConv2d] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: order.append(m) if m not in order else None)
             for m in todo]
    for m in todo:
        m._in_init = True
    try:
        forward(batches[0])  # records the order; each layer's input depends only on earlier ones
        for h in hooks:
            h.remove()
        for conv in order:
            conv._begin_init()
            for b in batches:
                try:
                    forward(b)
                except _StopForward:
                    pass
            conv._end_init(std)
    finally:
        for h in hooks:
            h.remove()
        for m in todo:
            m._collect, m._in_init = None, False
    if len(order) != len(todo):
        raise RuntimeError(f"data_init: {len(todo) - len(order)} WNConv2d layers were never called "
                           "by the forward pass, so they could not be initialised")
    return len(order)
