"""Energy networks E(x) of VAEBM, layer for layer as Table 7 (Appendix E) of the paper.

3x3 conv stem (bias) -> swish -> ResBlocks -> global SUM pooling -> linear -> one energy per
sample. Every conv is weight-normalised with data-dependent init; Swish is scaled by 1/1.1.
Input x (B, C, H, W) in [0, 1]; output (B,) float32 (float64 for float64 input).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.swish import swish_ref
from ..ops.weight_norm import weight_norm_ref
from .layers import ResBlock, WNConv2d, data_init, wn_convs

# (in_channels, resolution, stem width, ((out_channels, down), ...)); "d" marks "ResBlock down"
def _blocks(spec: str):
    return tuple((int(s.rstrip("d")), s.endswith("d")) for s in spec.split())


PRESETS = {
    # Table 7 of the paper
    "cifar10": (3, 32, 128, _blocks("128d 128 256d 256 256d 256")),
    "celeba64": (3, 64, 64, _blocks("64d 64 128d 128 128d 256 256d 256")),
    "lsun_church64": (3, 64, 64, _blocks("64d 64 128d 128 128 128d 256 256 256d 256")),
    "celebahq256": (3, 256, 64, _blocks("64d 64 128d 128 128d 128 256d 256 256d 256 512d 512")),
    # not in the paper: small grayscale nets (28 -> 14 -> 7 -> 3, 32 -> 16 -> 8 -> 4)
    "mnist": (1, 28, 64, _blocks("64d 64 128d 128 128d 128")),
    "fashion_mnist": (1, 28, 64, _blocks("64d 64 128d 128 128d 128")),
    "mnist32": (1, 32, 64, _blocks("64d 64 128d 128 128d 128")),
    "fashion_mnist32": (1, 32, 64, _blocks("64d 64 128d 128 128d 128")),
    # half width (a quarter of the FLOPs) for CPU-budget runs on 28x28 images (grey, or
    # StackedMNIST with in_channels=3): at 64 channels the energy net cost 60% of an eps-space
    # Langevin step of the `mnist` NVAE at batch 32
    "mnist_small": (1, 28, 32, _blocks("32d 32 64d 64 64d 64")),
    # for tests: every kind of skip (1x1 for down, 1x1 for a channel change, identity)
    "tiny": (3, 8, 8, _blocks("8d 8 16 16d")),
}
PAPER_PRESETS = ("cifar10", "celeba64", "lsun_church64", "celebahq256")


class EnergyNet(nn.Module):
    """E(x): (B, C, H, W) in [0, 1] -> (B,). ``preset`` names a row of :data:`PRESETS`; ``width``
    multiplies every channel count; ``in_channels``/``resolution`` override the preset's.
    ``config`` holds everything needed to rebuild the net (store it in checkpoints).
    """

    def __init__(self, preset: str = "cifar10", *, width: float = 1.0,
                 in_channels: int | None = None, resolution: int | None = None):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        c_in, res, stem, blocks = PRESETS[preset]
        self.in_channels = c_in if in_channels is None else int(in_channels)
        self.resolution = res if resolution is None else int(resolution)
        n_down = sum(d for _, d in blocks)
        if self.resolution >> n_down < 1:
            raise ValueError(f"resolution {self.resolution} is too small for {n_down} "
                             f"downsampling blocks of preset {preset!r}")
        self.config = dict(preset=preset, width=width, in_channels=self.in_channels,
                           resolution=self.resolution)
        ch = lambda c: max(1, round(c * width))  # noqa: E731
        self.stem = WNConv2d(self.in_channels, ch(stem), 3)
        layers, c = [], ch(stem)
        for out, down in blocks:
            layers.append(ResBlock(c, ch(out), down))
            c = ch(out)
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Linear(c, 1)
        self._frozen_head: tuple[Tensor, Tensor] | None = None
        self._channels_last = False

    @property
    def expected_shape(self) -> tuple:
        return ("B", self.in_channels, self.resolution, self.resolution)

    def _check(self, x: Tensor) -> None:
        want = self.expected_shape[1:]
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"EnergyNet({self.config['preset']!r}) expects input of shape "
                             f"(B, {self.in_channels}, {self.resolution}, {self.resolution}) "
                             f"with values in [0, 1], got {got}")
        if not x.is_floating_point():
            raise TypeError(f"EnergyNet expects floating-point input in [0, 1], got {x.dtype}; "
                            "convert uint8 images with x.float() / 255")

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [0, 1] -> energies (B,), float32 (float64 for float64 input)."""
        self._check(x)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.stem(x, act=True)
        for block in self.blocks:
            h = block(h)
        h = h.sum(dim=(2, 3))  # global sum pooling: (B, C)
        w, b = self._frozen_head or (self.head.weight, self.head.bias)
        e = F.linear(h, w, b).squeeze(1)
        return e.float() if e.dtype in (torch.float16, torch.bfloat16) else e

    # ---------------------------------------------------------------- training helpers
    def data_init(self, batches, *, force: bool = False) -> int:
        """Data-dependent init from a list of (B, C, H, W) batches in [0, 1] (the published code
        uses 5 training batches); returns the number of convs initialised, 0 when all already
        were (e.g. after loading a checkpoint) unless ``force``."""
        if self.is_frozen:
            raise RuntimeError("data_init on a frozen EnergyNet: unfreeze() it first")
        return data_init(self, batches, force=force)

    @property
    def initialised(self) -> bool:
        return all(bool(m.initialised) for m in wn_convs(self))

    def spectral_regularisation(self, n_iter: int | None = None) -> Tensor:
        """Sum over all convs of the spectral norm of the normalised weight (C_out, C_in*k*k),
        a differentiable 0-d tensor; the training loss adds it times alpha (0.2 by default)."""
        return torch.stack([m.spectral_norm(n_iter) for m in wn_convs(self)]).sum()

    # ---------------------------------------------------------------- sampling mode
    @property
    def is_frozen(self) -> bool:
        return self._frozen_head is not None

    def freeze(self, channels_last: bool = False) -> "EnergyNet":
        """Sampling mode: normalised weights computed once and cached, detached (gradients reach
        the input only). ``channels_last`` stores weights and runs activations in NHWC, faster
        for CPU convs. Works under bf16/fp16 autocast (weights cast once per dtype). The cache
        goes stale if the parameters change: unfreeze() before an optimiser step."""
        for m in wn_convs(self):
            m.freeze(channels_last)
        self._frozen_head = (self.head.weight.detach().clone(), self.head.bias.detach().clone())
        self._channels_last = channels_last
        return self

    def unfreeze(self) -> "EnergyNet":
        for m in wn_convs(self):
            m.unfreeze()
        self._frozen_head, self._channels_last = None, False
        return self

    @contextlib.contextmanager
    def frozen(self, channels_last: bool = False):
        """``with net.frozen(): ...`` freezes for the block and restores the previous state."""
        was = self.is_frozen
        self.freeze(channels_last)
        try:
            yield self
        finally:
            if not was:
                self.unfreeze()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen_head = None  # cached weights would be stale


def energy_ref(net: EnergyNet, x: Tensor) -> Tensor:
    """The network written the plain way, the specification the fast path is tested against:
    conv+bias, swish_ref, conv+bias, skip, sum, avg_pool, swish_ref; sum pooling; linear."""
    def conv(m: WNConv2d, h, bias=True):
        w = weight_norm_ref(m.weight_v, m.log_g)
        return F.conv2d(h, w, m.bias if bias else None, m.stride, m.padding)

    h = swish_ref(conv(net.stem, x))
    for blk in net.blocks:
        y = conv(blk.conv2, swish_ref(conv(blk.conv1, h)))
        y = y + (h if blk.skip is None else conv(blk.skip, h))
        h = swish_ref(F.avg_pool2d(y, 2) if blk.down else y)
    return net.head(h.sum(dim=(2, 3))).squeeze(1)


def count_parameters(preset: str, width: float = 1.0) -> int:
    """Number of trainable parameters of ``EnergyNet(preset, width=width)`` (built on meta)."""
    with torch.device("meta"):
        net = EnergyNet(preset, width=width)
    return sum(p.numel() for p in net.parameters())


def describe(preset: str, width: float = 1.0) -> str:
    """Layer-by-layer parameter table (markdown) of a preset, built on the meta device."""
    with torch.device("meta"):
        net = EnergyNet(preset, width=width)
    res, rows = net.resolution, []
    rows.append(("stem 3x3 conv", net.stem.out_channels, res, _n(net.stem)))
    for i, b in enumerate(net.blocks):
        res = res // 2 if b.down else res
        kind = "ResBlock down" if b.down else "ResBlock"
        rows.append((f"{i + 1}: {kind} {b.in_channels}->{b.out_channels}", b.out_channels, res,
                     _n(b)))
    rows.append(("global sum pooling + linear", 1, 1, _n(net.head)))
    total = sum(r[-1] for r in rows)
    lines = [f"EnergyNet({preset!r}, width={width}): input (B, {net.in_channels}, "
             f"{net.resolution}, {net.resolution}), {len(wn_convs(net))} convs, "
             f"{total:,} parameters", "",
             "| layer | channels | output size | parameters |", "|---|---|---|---|"]
    lines += [f"| {a} | {c} | {r}x{r} | {n:,} |" for a, c, r, n in rows]
    return "\n".join(lines)


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
