"""Inverse-autoregressive flow cells of NVAE's approximate posterior (never on the eps -> x path).

A flow cell maps z -> z - mu(z), mu autoregressive over (raster position, then channel), so the
Jacobian is unit lower-triangular and log|det| = 0 (volume preserving). A paired cell runs the
raster order, then the reversed ("mirror") order. mu is a masked inverted residual:
ELU(masked 3x3, Z -> 6Z, strict) -> ELU(masked depthwise 5x5) -> ELU -> masked 1x1 (6Z -> Z).

Names follow the published code (``cell1``/``cell2``, ``conv.convz.{0,2}``, ``mu.conv_0``); masks
are recomputed from the shapes (the published code does not save them either).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cells import Conv2D, _log_norm_init


def channel_mask(c_in: int, g_in: int, c_out: int, zero_diag: bool) -> Tensor:
    """Centre-tap mask (c_out, c_in // g_in): output channel block i sees input channels <= i
    (< i when ``zero_diag``); channel groups are blocks of c_out // c_in (or c_in // c_out)."""
    if not (c_in % c_out == 0 or c_out % c_in == 0):
        raise ValueError(f"autoregressive conv needs c_in | c_out or c_out | c_in, got "
                         f"{c_in}, {c_out}")
    if g_in == c_in:  # depthwise: each channel sees only itself
        return torch.full((c_out, 1), 0.0 if zero_diag else 1.0, device="cpu")
    if g_in != 1:
        raise ValueError("autoregressive conv supports groups 1 or depthwise only")
    out_idx = torch.arange(c_out, device="cpu").view(-1, 1)
    in_idx = torch.arange(c_in, device="cpu").view(1, -1)
    if c_out >= c_in:
        block = out_idx // (c_out // c_in)          # the input channel this output row belongs to
        keep = in_idx < block if zero_diag else in_idx <= block
    else:
        r = c_in // c_out
        keep = in_idx < out_idx * r if zero_diag else in_idx < (out_idx + 1) * r
    return keep.float()


def conv_mask(kernel_size: int, c_in: int, g_in: int, c_out: int, zero_diag: bool,
              mirror: bool) -> Tensor:
    """(c_out, c_in // g_in, k, k): taps strictly before the centre in raster order are 1, after
    it 0, the centre tap is :func:`channel_mask`; ``mirror`` reverses the spatial order."""
    k = kernel_size
    m = (k - 1) // 2
    mask = torch.zeros(c_out, c_in // g_in, k, k, device="cpu")
    mask[:, :, :m, :] = 1
    mask[:, :, m, :m] = 1
    mask[:, :, m, m] = channel_mask(c_in, g_in, c_out, zero_diag)
    return mask.flip(2, 3) if mirror else mask


class ARConv2d(Conv2D):
    """Masked, weight-normed conv: w = exp(log_weight_norm) * (v*mask) / (||v*mask|| + 1e-5)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = False, masked: bool = False,
                 zero_diag: bool = False, mirror: bool = False):
        super().__init__(C_in, C_out, kernel_size, stride, padding, dilation, groups, bias,
                         weight_norm=False)
        if masked and kernel_size % 2 == 0:
            raise ValueError("a masked conv needs an odd kernel size")
        self.masked = masked
        # a CPU copy plus per-(device, dtype) copies, not a buffer: the mask is a function of
        # the shapes, so it survives meta-device construction, to_empty() and state-dict loads
        self._mask_cpu = (conv_mask(kernel_size, C_in, groups, C_out, zero_diag, mirror)
                          if masked else None)
        self._mask_cache: dict = {}
        self.log_weight_norm = nn.Parameter(_log_norm_init(self._masked_weight()))

    @property
    def mask(self) -> Tensor | None:
        """(C_out, C_in/groups, k, k) 0/1 mask on the weight's device and dtype (None: unmasked)."""
        if self._mask_cpu is None:
            return None
        w = self.weight
        key = (w.device, w.dtype)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._mask_cpu.to(device=w.device, dtype=w.dtype)
        return self._mask_cache[key]

    def _masked_weight(self) -> Tensor:
        return self.weight * self.mask if self.masked else self.weight


class ARELUConv(nn.Module):
    """ELU then masked conv (``conv_0``); log-scale shifted by log(weight_init_coeff)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, padding: int = 0,
                 dilation: int = 1, masked: bool = True, zero_diag: bool = True,
                 weight_init_coeff: float = 1.0, mirror: bool = False):
        super().__init__()
        self.conv_0 = ARConv2d(C_in, C_out, kernel_size, padding=padding, bias=True,
                               dilation=dilation, masked=masked, zero_diag=zero_diag, mirror=mirror)
        with torch.no_grad():
            self.conv_0.log_weight_norm.add_(math.log(weight_init_coeff))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_0(F.elu(x))


class ARInvertedResidual(nn.Module):
    """Masked 3x3 (Z -> ex*Z, strict) -> ELU -> masked depthwise kxk -> ELU, as ``convz``."""

    def __init__(self, inz: int, inf: int, ex: int = 6, dil: int = 1, k: int = 5,
                 mirror: bool = False):
        super().__init__()
        hidden = int(round(inz * ex))
        pad = dil * (k - 1) // 2
        self.convz = nn.Sequential(
            ARConv2d(inz, hidden, 3, padding=1, masked=True, mirror=mirror, zero_diag=True),
            nn.ELU(inplace=True),
            ARConv2d(hidden, hidden, k, padding=pad, dilation=dil, groups=hidden, masked=True,
                     mirror=mirror, zero_diag=False),
            nn.ELU(inplace=True))
        self.hidden_dim = hidden

    def forward(self, z: Tensor, ftr: Tensor | None = None) -> Tensor:
        return self.convz(z)


class CellAR(nn.Module):
    """One volume-preserving IAF step z -> z - mu(z); returns (new_z, log_det = 0)."""

    cell_type = "ar_nn"

    def __init__(self, num_z: int, num_ftr: int, mirror: bool):
        super().__init__()
        self.conv = ARInvertedResidual(num_z, num_ftr, ex=6, mirror=mirror)
        # the 0.1 keeps mu near 0 at the start, so the flow starts close to the identity
        self.mu = ARELUConv(self.conv.hidden_dim, num_z, kernel_size=1, padding=0, masked=True,
                            zero_diag=False, weight_init_coeff=0.1, mirror=mirror)

    def forward(self, z: Tensor, ftr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        new_z = z - self.mu(self.conv(z, ftr))
        return new_z, torch.zeros_like(new_z)


class PairedCellAR(nn.Module):
    """Two IAF steps, raster order then reversed. (B, Z, H, W) -> ((B, Z, H, W), log_det like z).
    ``ftr`` (the encoder feature) is accepted and unused, as in the published model."""

    def __init__(self, num_z: int, num_ftr: int):
        super().__init__()
        self.cell1 = CellAR(num_z, num_ftr, mirror=False)
        self.cell2 = CellAR(num_z, num_ftr, mirror=True)

    def forward(self, z: Tensor, ftr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, ld1 = self.cell1(z, ftr)
        z, ld2 = self.cell2(z, ftr)
        return z, ld1 + ld2
