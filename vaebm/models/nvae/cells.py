"""NVAE building blocks: weight-normed conv, BN(+Swish), squeeze-excitation and the residual cells.

Module and parameter names follow the published NVAE code (``Conv2D.log_weight_norm``,
``Cell._ops``/``skip``/``se``, ``InvertedResidual.conv.<i>``, the ``.bn.`` of the plain BNs),
so an official state dict maps onto these modules key for key (the only published extra is
``*.weight_normalized``, an alias of ``*.weight`` for the convs without weight norm). The code
is an independent implementation.

Cells (``Cell``): ``out = skip(x) + 0.1 * SE(op_n(... op_0(x)))``.

- encoder cells (``res_bnswish``): BN -> Swish -> conv3x3, twice; a ``down`` cell uses stride 2 in
  its first op and a factorised-reduce skip (Swish, four shifted 1x1 stride-2 convs, concatenated).
- decoder cells (``mconv``, inverted residual): BN -> 1x1 conv -> BN -> Swish -> depthwise kxk
  conv -> BN -> Swish -> 1x1 conv -> BN; an ``up`` cell first upsamples (nearest) and its skip
  is a bilinear upsample followed by a 1x1 conv.

Sampling mode (:meth:`Cell.freeze`, eval only): normalised weights are cached and every BN of an
inverted residual is folded into the neighbouring 1x1/depthwise conv, leaving
``conv1x1 -> swish -> dwconv -> swish -> conv1x1``; in up cells the first 1x1 conv, its Swish and
the skip's 1x1 conv run before the upsample (they commute with it), at a quarter of the cost.
Swish here is the plain x * sigmoid(x) of NVAE (not the 1-Lipschitz /1.1 of the energy net).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import conv as fast_conv

BN_EPS = 1e-5
BN_MOMENTUM = 0.05
WN_EPS = 1e-5      # added to ||v|| in the weight norm (as published)
CHANNEL_MULT = 2


def soft_clamp5(x: Tensor) -> Tensor:
    """5 tanh(x / 5): a differentiable clamp to (-5, 5)."""
    return torch.tanh(x / 5.0) * 5.0


def _autocast_cached(cache: dict, key: str) -> Tensor:
    """Cached frozen tensor, cast once per autocast dtype rather than at every conv call."""
    w = cache[key]
    dev = w.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt != w.dtype and w.is_floating_point():
            casts = cache.setdefault("casts", {})
            if (key, dt) not in casts:
                casts[key, dt] = w.to(dt)
            return casts[key, dt]
    return w


def _log_norm_init(w: Tensor) -> Tensor:
    """log(||w_o|| + 0.01) per output channel, (C_out, 1, 1, 1); shape only on the meta device
    (describe() counts parameters there, and the norm would pull in slow reference kernels)."""
    if w.is_meta:
        return torch.empty(w.shape[0], 1, 1, 1, device="meta", dtype=w.dtype)
    return torch.log(w.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-2)


class Conv2D(nn.Conv2d):
    """nn.Conv2d with NVAE's weight norm: w = exp(log_weight_norm) * v / (||v|| + 1e-5), per output
    channel (``log_weight_norm`` (C_out, 1, 1, 1), initialised to log(||v|| + 0.01)).
    ``weight_norm=False``: the plain weight. Buffers ``sr_u`` (C_out,) and ``sr_v``
    (C_in/groups*k*k,) hold the spectral regulariser's power-iteration vectors.
    (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = False, weight_norm: bool = True):
        super().__init__(C_in, C_out, kernel_size, stride, padding, dilation, groups, bias)
        if weight_norm:
            self.log_weight_norm = nn.Parameter(_log_norm_init(self._masked_weight()))
        else:
            self.log_weight_norm = None
        self.register_buffer("sr_u", torch.zeros(C_out))
        self.register_buffer("sr_v", torch.zeros(self.weight[0].numel()))
        self._frozen: dict | None = None

    def _masked_weight(self) -> Tensor:
        return self.weight

    def normalized_weight(self) -> Tensor:
        """The effective weight (C_out, C_in/groups, k, k), recomputed from the parameters."""
        w = self._masked_weight()
        if self.log_weight_norm is None:
            return w
        n = w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return torch.exp(self.log_weight_norm) * w / (n + WN_EPS)

    def freeze(self, weight: Tensor | None = None, bias: Tensor | None = None,
               channels_last: bool = False) -> None:
        """Cache the weight (or a given, e.g. BN-folded, weight and bias) for sampling."""
        with torch.no_grad():
            w = self.normalized_weight() if weight is None else weight
            b = (self.bias if bias is None else bias)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self._frozen = {"w": w.detach().contiguous(memory_format=fmt),
                            "b": None if b is None else b.detach().clone()}
            # the input-gradient weights of the CPU fast paths (vaebm.ops.conv)
            if self.kernel_size == (1, 1) and self.groups == 1:
                self._frozen["wt"] = fast_conv.transpose_weight(w)
            elif self.groups == self.in_channels == self.out_channels:
                self._frozen["wf"] = fast_conv.flip_weight(w)

    def unfreeze(self) -> None:
        self._frozen = None

    def forward(self, x: Tensor) -> Tensor:
        if self._frozen is not None:
            w = self._frozen["w"]
            if "wt" in self._frozen and fast_conv.supported(x, w, self.stride, self.padding,
                                                            self.dilation, self.groups):
                # one-thread CPU: oneDNN instead of PyTorch's im2col pick for 1x1 convs, where
                # it measures faster on this machine (fast_conv.prefer)
                if fast_conv.prefer("1x1", x, self._fast_1x1, self._plain, w.shape):
                    return self._fast_1x1(x)
            elif "wf" in self._frozen and fast_conv.depthwise_supported(
                    x, w, self.stride, self.padding, self.dilation, self.groups):
                if fast_conv.prefer("dw", x, self._fast_dw, self._plain,
                                    (*w.shape, self.padding[0])):
                    return self._fast_dw(x)
            return self._plain(x)
        w = self.normalized_weight()
        if (self.groups > 1 and self.groups == self.in_channels == self.out_channels
                and torch.is_grad_enabled() and fast_conv.depthwise_train_supported(
                    x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)):
            # stage-1 training on the CPU: PyTorch's weight gradient of a depthwise conv was
            # half of an `mnist` iteration; forward + both gradients on the C++ kernels were
            # 1.5-3x faster with the ISA capped at AVX2 and up to 13x with AVX-512 on every
            # decoder shape we measured. Chosen by rule, not by timing: a training run must
            # take the same path in every process, or resume would not be bit for bit
            if fast_conv.policy() != "torch":
                return fast_conv.depthwise_train(x, w, self.padding[0], check=False)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _plain(self, x: Tensor) -> Tensor:
        b = self._frozen["b"]
        return F.conv2d(x, _autocast_cached(self._frozen, "w"),
                        None if b is None else _autocast_cached(self._frozen, "b"),
                        self.stride, self.padding, self.dilation, self.groups)

    def _fast_1x1(self, x: Tensor) -> Tensor:
        b = self._frozen["b"]
        return fast_conv.conv1x1(x, _autocast_cached(self._frozen, "w"),
                                 None if b is None else _autocast_cached(self._frozen, "b"),
                                 _autocast_cached(self._frozen, "wt"), check=False)

    def _fast_dw(self, x: Tensor) -> Tensor:
        return fast_conv.depthwise(x, self._frozen["w"], self._frozen["b"], self.padding[0],
                                   self._frozen["wf"], check=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = None


class BNSwish(nn.BatchNorm2d):
    """swish(batch_norm(x)); NVAE's fused ``SyncBatchNormSwish`` (same parameter names)."""

    def __init__(self, C: int):
        super().__init__(C, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(super().forward(x))


class SyncBNSwish(nn.SyncBatchNorm):
    """swish(sync_batch_norm(x)): :class:`BNSwish` for multi-process training."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(super().forward(x))


def to_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BN (fused BN+Swish included) below ``module`` with its synchronised form,
    keeping parameters and statistics. (``nn.SyncBatchNorm.convert_sync_batchnorm`` would turn
    a :class:`BNSwish` into a plain SyncBatchNorm and silently drop the Swish.)"""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            cls = SyncBNSwish if isinstance(child, BNSwish) else nn.SyncBatchNorm
            new = cls(child.num_features, child.eps, child.momentum, child.affine,
                      child.track_running_stats, process_group)
            new.load_state_dict(child.state_dict())
            new.to(device=child.running_mean.device)
            new.train(child.training)
            setattr(module, name, new)
        else:
            to_sync_batchnorm(child, process_group)
    return module


class BatchNorm(nn.Module):
    """A plain BN kept one level down (``.bn.``), where the published wrapper put it."""

    def __init__(self, C: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(C, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as y = a * x + b: returns (a, b), each (C,)."""
    a = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        a = a * bn.weight
    b = -bn.running_mean * a
    if bn.bias is not None:
        b = b + bn.bias
    return a, b


class BNSwishConv(nn.Module):
    """Encoder op: BN -> Swish -> [nearest x2 if up] -> conv kxk (bias). (B, C_in, H, W) ->
    (B, C_out, H/stride, W/stride)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1):
        super().__init__()
        self.upsample = stride == -1
        self.bn_act = BNSwish(C_in)
        self.conv_0 = Conv2D(C_in, C_out, kernel_size, stride=abs(stride), padding=padding,
                             bias=True, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn_act(x)
        if self.upsample:
            out = F.interpolate(out, scale_factor=2, mode="nearest")
        return self.conv_0(out)


class ConvBNSwish(nn.Module):
    """conv (no bias, no weight norm) -> BN -> Swish, as ``conv.0`` / ``conv.1``."""

    def __init__(self, C_in: int, C_out: int, k: int = 3, stride: int = 1, groups: int = 1,
                 dilation: int = 1):
        super().__init__()
        padding = dilation * (k - 1) // 2
        self.conv = nn.Sequential(
            Conv2D(C_in, C_out, k, stride, padding, dilation=dilation, groups=groups, bias=False,
                   weight_norm=False),
            BNSwish(C_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class InvertedResidual(nn.Module):
    """Decoder op (MobileNetV2-style): [nearest x2] -> BN -> 1x1 -> BN-Swish -> depthwise kxk ->
    BN-Swish -> 1x1 -> BN, hidden width round(C_in * ex). (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, C_in: int, C_out: int, stride: int, ex: float, dil: int = 1, k: int = 5,
                 g: int = 0):
        super().__init__()
        if stride not in (1, 2, -1):
            raise ValueError(f"stride must be 1, 2 or -1 (up), got {stride}")
        self.hidden_dim = hidden = int(round(C_in * ex))
        self.upsample = stride == -1
        groups = hidden if g == 0 else g
        layers: list[nn.Module] = [nn.UpsamplingNearest2d(scale_factor=2)] if self.upsample else []
        layers += [BatchNorm(C_in),
                   ConvBNSwish(C_in, hidden, k=1),
                   ConvBNSwish(hidden, hidden, stride=abs(stride), groups=groups, k=k,
                               dilation=dil),
                   Conv2D(hidden, C_out, 1, 1, 0, bias=False, weight_norm=False),
                   BatchNorm(C_out)]
        self.conv = nn.Sequential(*layers)
        self._frozen = False

    def _parts(self):
        o = 1 if self.upsample else 0
        c = self.conv
        return c[o].bn, c[o + 1].conv[0], c[o + 1].conv[1], c[o + 2].conv[0], c[o + 2].conv[1], \
            c[o + 3], c[o + 4].bn

    def freeze(self, channels_last: bool = False) -> None:
        """Fold the four BNs into the three convs (eval-mode statistics; eval mode only)."""
        if self.training:
            raise RuntimeError("InvertedResidual.freeze() folds the running BN statistics: "
                               "call eval() first")
        bn0, conv1, bn1, conv2, bn2, conv3, bn3 = self._parts()
        with torch.no_grad():
            a0, b0 = bn_affine(bn0)
            w1 = conv1.normalized_weight()                       # (h, C_in, 1, 1)
            a1, b1 = bn_affine(bn1)
            # conv1(a0 x + b0) = (w1 * a0) x + w1 b0, then bn1
            w1f = w1 * a0.view(1, -1, 1, 1) * a1.view(-1, 1, 1, 1)
            b1f = a1 * (w1.flatten(1) @ b0) + b1
            a2, b2 = bn_affine(bn2)
            w2f = conv2.normalized_weight() * a2.view(-1, 1, 1, 1)
            a3, b3 = bn_affine(bn3)
            w3f = conv3.normalized_weight() * a3.view(-1, 1, 1, 1)
            conv1.freeze(w1f, b1f, channels_last)
            conv2.freeze(w2f, b2, channels_last)
            conv3.freeze(w3f, b3, channels_last)
        self._frozen = True

    def unfreeze(self) -> None:
        _, conv1, _, conv2, _, conv3, _ = self._parts()
        for m in (conv1, conv2, conv3):
            m.unfreeze()
        self._frozen = False

    def forward(self, x: Tensor) -> Tensor:
        if not self._frozen:
            return self.conv(x)
        _, conv1, _, conv2, _, conv3, _ = self._parts()
        h = F.silu(conv1(x))  # 1x1 conv and swish commute with the nearest upsample
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        return conv3(F.silu(conv2(h)))


class FactorizedReduce(nn.Module):
    """Down-sampling skip: swish, then four 1x1 stride-2 convs on the four pixel phases,
    concatenated to C_out channels. (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        q = C_out // 4
        self.conv_1 = Conv2D(C_in, q, 1, stride=2, bias=True)
        self.conv_2 = Conv2D(C_in, q, 1, stride=2, bias=True)
        self.conv_3 = Conv2D(C_in, q, 1, stride=2, bias=True)
        self.conv_4 = Conv2D(C_in, C_out - 3 * q, 1, stride=2, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        a = F.silu(x)
        return torch.cat([self.conv_1(a), self.conv_2(a[:, :, 1:, 1:]),
                          self.conv_3(a[:, :, :, 1:]), self.conv_4(a[:, :, 1:, :])], dim=1)


class UpSample(nn.Module):
    """Bilinear x2 with aligned corners (the up-cell skip)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class UpSkip(nn.Sequential):
    """Up-cell skip: bilinear x2 then 1x1 conv (no bias) as ``skip.1``; frozen: conv first (the
    two commute: bilinear weights sum to one and the conv mixes only channels)."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__(UpSample(), Conv2D(C_in, C_out, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        if self[1]._frozen is not None:
            return self[0](self[1](x))
        return self[1](self[0](x))


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class SE(nn.Module):
    """Squeeze-excitation: x * sigmoid(W2 relu(W1 mean_hw(x))), hidden max(C_out // 16, 4)."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__()
        hidden = max(C_out // 16, 4)
        self.se = nn.Sequential(nn.Linear(C_in, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, C_out), nn.Sigmoid())

    def gate(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 1, 1) multiplier."""
        return self.se(x.mean(dim=(2, 3))).view(x.shape[0], -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


# op name -> (constructor(C_in, C_out, stride)); the names of the published ``res_mbconv`` recipe
OPS = {
    "res_bnswish": lambda Ci, Co, s: BNSwishConv(Ci, Co, 3, s, 1),
    "mconv_e6k5g0": lambda Ci, Co, s: InvertedResidual(Ci, Co, s, ex=6, dil=1, k=5, g=0),
    "mconv_e3k5g0": lambda Ci, Co, s: InvertedResidual(Ci, Co, s, ex=3, dil=1, k=5, g=0),
}

ARCH_INSTANCES = {
    "res_mbconv": {
        "normal_enc": ["res_bnswish", "res_bnswish"], "down_enc": ["res_bnswish", "res_bnswish"],
        "normal_dec": ["mconv_e6k5g0"], "up_dec": ["mconv_e6k5g0"],
        "normal_pre": ["res_bnswish", "res_bnswish"], "down_pre": ["res_bnswish", "res_bnswish"],
        "normal_post": ["mconv_e3k5g0"], "up_post": ["mconv_e3k5g0"],
    },
}


def stride_for_cell_type(cell_type: str) -> int:
    if cell_type.startswith(("normal", "combiner")):
        return 1
    if cell_type.startswith("down"):
        return 2
    if cell_type.startswith("up"):
        return -1
    raise ValueError(f"unknown cell type {cell_type!r}")


class Cell(nn.Module):
    """Residual cell: skip(x) + 0.1 * SE(ops(x)). ``cell_type`` is normal_*/down_*/up_*;
    down halves H, W and doubles C; up doubles H, W and halves C (C_out is given)."""

    def __init__(self, C_in: int, C_out: int, cell_type: str, arch: list[str], use_se: bool):
        super().__init__()
        self.cell_type = cell_type
        stride = stride_for_cell_type(cell_type)
        if stride == 1:
            self.skip = Identity()
        elif stride == 2:
            self.skip = FactorizedReduce(C_in, int(CHANNEL_MULT * C_in))
        else:
            self.skip = UpSkip(C_in, int(C_in / CHANNEL_MULT))
        self.use_se = use_se
        self._ops = nn.ModuleList()
        for i, name in enumerate(arch):
            if name not in OPS:
                raise ValueError(f"unknown NVAE op {name!r}; known: {sorted(OPS)}")
            self._ops.append(OPS[name](C_in if i == 0 else C_out, C_out, stride if i == 0 else 1))
        if use_se:
            self.se = SE(C_out, C_out)

    def forward(self, s: Tensor) -> Tensor:
        skip = self.skip(s)
        for op in self._ops:
            s = op(s)
        if self.use_se:
            return torch.addcmul(skip, s, self.se.gate(s), value=0.1)
        return skip + 0.1 * s


class EncCombinerCell(nn.Module):
    """x1 + conv1x1(x2): the encoder feature plus the projected decoder state."""

    def __init__(self, Cin1: int, Cin2: int, Cout: int, cell_type: str = "combiner_enc"):
        super().__init__()
        self.cell_type = cell_type
        self.conv = Conv2D(Cin2, Cout, kernel_size=1, bias=True)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return x1 + self.conv(x2)


class DecCombinerCell(nn.Module):
    """conv1x1(cat(x1, z)): feeds a latent group into the decoder state."""

    def __init__(self, Cin1: int, Cin2: int, Cout: int, cell_type: str = "combiner_dec"):
        super().__init__()
        self.cell_type = cell_type
        self.conv = Conv2D(Cin1 + Cin2, Cout, kernel_size=1, bias=True)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.conv(torch.cat([x1, x2], dim=1))
