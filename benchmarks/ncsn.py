"""NCSN (Song & Ermon, 2019) and NCSNv2 (Song & Ermon, 2020) score networks and their annealed
Langevin samplers, written from the papers and ``/work/shared/ncsn-architecture.md`` for the
sampling-speed comparison of VAEBM Sec. 5.5 (no weights: the cost of a forward pass does not
depend on their values).

Networks (CIFAR-10, ngf = 128, input (B, 3, 32, 32) in [0, 1], output the score, same shape):

- :func:`ncsn_v1`: ``CondRefineNetDilated``. Conditional instance norm++ whose (gamma, alpha,
  beta) come from an embedding row picked by the noise-level index y (10 levels); ELU; norms also
  inside the refine blocks (RCU, CRP with a 5x5 *average* pool, MSF). 30,117,635 parameters,
  19.79 GFLOP per image forward (2 FLOPs per MAC). The output is not divided by sigma.
- :func:`ncsn_v2`: ``NCSNv2``. The same skeleton with unconditional instance norm++ (learned
  per-channel alpha, gamma, beta), refine blocks without norms and a 5x5 *max* pool in the CRP,
  output divided by sigma_y (232 levels). 29,694,083 parameters, 19.79 GFLOP per image.

Both map x to 2x - 1 first. Stage list: stem 3x3 conv; res1 2 x ResBlock(128) at 32x32; res2
ResBlock(128->256, down) + ResBlock(256) at 16x16; res3 and res4 the same at 256 channels with
dilation 2 and 4 (their "down" blocks do not downsample); refine1..4 RefineNet fusion back to
32x32; norm -> ELU -> 3x3 conv to 3 channels.

Samplers (:func:`annealed_langevin`), per noise level i with step_i = step_lr (sigma_i/sigma_L)^2::

    x <- x + step_i * s(x, i) + sqrt(2 step_i) * z,   z ~ N(0, I)

- v1 (:data:`NCSN_V1`): 10 sigmas geometric 1 -> 0.01, 100 steps each, step_lr 2e-5, x0 ~ U[0,1].
- v2 (:data:`NCSN_V2`): 232 sigmas geometric 50 -> 0.01, 5 steps each, step_lr 6.2e-6, then one
  denoising step x <- x + sigma_L^2 s(x, L-1). 1161 evaluations.

``mode="published"`` reproduces what the released sampling loops do besides the maths: v1 appends
``clamp(x, 0, 1).to('cpu')`` to a list before every step (1000 host copies, all kept); v2 (config
``final_only: true``) computes its per-step diagnostics (gradient, noise and image norms, snr) on
the device and copies only the final image. ``mode="eager"`` does the update alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

V1_PARAMS, V2_PARAMS = 30_117_635, 29_694_083  # measured on the released code (architecture notes)
GFLOP_PER_IMAGE = 19.79


# ------------------------------------------------------------------------------------ norms
class InstanceNormPlus(nn.Module):
    """Instance norm++ on x (B, C, H, W); y (B,) long noise-level index.

    mu_c = spatial mean per channel; a_c = (mu_c - mean_c(mu)) / sqrt(var_c(mu) + 1e-5) (unbiased
    variance over channels); out = gamma_c * (IN(x)_c + alpha_c * a_c) + beta_c. Conditional
    (``n_levels`` given): (gamma, alpha, beta) = Embedding(n_levels, 3C)[y], so every noise level
    has its own affine terms; unconditional: three (C,) parameters and y is ignored.
    Init: gamma, alpha ~ N(1, 0.02), beta = 0.
    """

    def __init__(self, channels: int, n_levels: int | None = None):
        super().__init__()
        self.channels, self.n_levels = channels, n_levels
        if n_levels is None:
            self.gamma = nn.Parameter(torch.empty(channels).normal_(1, 0.02))
            self.alpha = nn.Parameter(torch.empty(channels).normal_(1, 0.02))
            self.beta = nn.Parameter(torch.zeros(channels))
        else:
            self.embed = nn.Embedding(n_levels, 3 * channels)
            with torch.no_grad():
                self.embed.weight[:, :2 * channels].normal_(1, 0.02)
                self.embed.weight[:, 2 * channels:].zero_()

    def affine(self, y: Tensor | None, batch: int):
        """(gamma, alpha, beta), each (B, C, 1, 1) (conditional) or (1, C, 1, 1)."""
        if self.n_levels is None:
            return tuple(p.view(1, -1, 1, 1) for p in (self.gamma, self.alpha, self.beta))
        if y is None or y.shape != (batch,):
            raise ValueError(f"conditional instance norm++ needs y of shape ({batch},) with the "
                             f"noise-level index per sample, got "
                             f"{None if y is None else tuple(y.shape)}")
        g, a, b = self.embed(y).chunk(3, dim=1)
        return g[..., None, None], a[..., None, None], b[..., None, None]

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        mu = x.mean(dim=(2, 3))
        a = (mu - mu.mean(1, keepdim=True)) / torch.sqrt(mu.var(1, keepdim=True) + 1e-5)
        h = F.instance_norm(x, eps=1e-5)
        gamma, alpha, beta = self.affine(y, x.shape[0])
        return gamma * (h + alpha * a[..., None, None]) + beta


class _Normed(nn.Module):
    """Base for blocks that may hold norms: ``self.norm(c)`` builds one (or an identity)."""

    def __init__(self, norm: Callable[[int], nn.Module] | None):
        super().__init__()
        self._make_norm = norm

    def norm(self, c: int) -> nn.Module | None:
        return None if self._make_norm is None else self._make_norm(c)


def _apply(norm, x, y):
    return x if norm is None else norm(x, y)


def _conv(cin, cout, k=3, bias=True, dilation=1):
    return nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=bias)


# ------------------------------------------------------------------------------------ blocks
class ResBlock(nn.Module):
    """norm1 -> ELU -> conv1 -> norm2 -> ELU -> conv2, plus a shortcut. (B, Cin, H, W) ->
    (B, Cout, H', W'). ``down`` without dilation: conv2 is conv-then-2x2-mean-pool (H' = H/2) and
    the shortcut a 1x1 conv then the same pool; ``down`` with dilation keeps the size (as the
    released code) and uses a dilated 3x3 shortcut. All convs carry a bias."""

    def __init__(self, cin, cout, norm, down=False, dilation=None):
        super().__init__()
        d = dilation or 1
        self.pool = down and dilation is None
        mid = cin if down else cout
        self.norm1, self.norm2 = norm(cin), norm(mid)
        self.conv1 = _conv(cin, mid, dilation=d)
        self.conv2 = _conv(mid, cout, dilation=d)
        if down or cin != cout:
            if not down and dilation is None:
                raise NotImplementedError("a same-size block changing channels is not used by NCSN")
            self.shortcut = _conv(cin, cout, k=1) if self.pool else _conv(cin, cout, dilation=d)
        else:
            self.shortcut = None

    def forward(self, x, y):
        h = self.conv1(F.elu(self.norm1(x, y)))
        h = self.conv2(F.elu(self.norm2(h, y)))
        s = x if self.shortcut is None else self.shortcut(x)
        if self.pool:  # mean of the four stride-2 phases == 2x2 average pooling
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class RCU(_Normed):
    """Residual conv unit: n_blocks x (residual + n_stages x ([norm] -> ELU -> conv3x3, no bias))."""

    def __init__(self, c, n_blocks, n_stages, norm):
        super().__init__(norm)
        self.n_stages = n_stages
        self.norms = nn.ModuleList(self.norm(c) for _ in range(n_blocks * n_stages)) \
            if norm is not None else None
        self.convs = nn.ModuleList(_conv(c, c, bias=False) for _ in range(n_blocks * n_stages))

    def forward(self, x, y):
        for i, conv in enumerate(self.convs):
            if i % self.n_stages == 0:
                res = x
            n = None if self.norms is None else self.norms[i]
            x = conv(F.elu(_apply(n, x, y)))
            if (i + 1) % self.n_stages == 0:
                x = x + res
        return x


class CRP(_Normed):
    """Chained residual pooling: x = ELU(x); path = x; per stage path = conv3x3_nobias(pool5x5(
    [norm](path))), x = x + path. Pool is average (v1) or max (v2), stride 1, padding 2."""

    def __init__(self, c, n_stages, norm, pool):
        super().__init__(norm)
        self.norms = nn.ModuleList(self.norm(c) for _ in range(n_stages)) \
            if norm is not None else None
        self.convs = nn.ModuleList(_conv(c, c, bias=False) for _ in range(n_stages))
        self.pool = pool

    def forward(self, x, y):
        x = F.elu(x)
        path = x
        for i, conv in enumerate(self.convs):
            path = _apply(None if self.norms is None else self.norms[i], path, y)
            if self.pool == "avg":  # count_include_pad, as nn.AvgPool2d's default
                path = F.avg_pool2d(path, 5, stride=1, padding=2)
            else:
                path = F.max_pool2d(path, 5, stride=1, padding=2)
            path = conv(path)
            x = x + path
        return x


class RefineBlock(_Normed):
    """RefineNet fusion of ``len(in_channels)`` inputs: adapt each (RCU 2x2), multi-resolution
    fusion ([norm] -> conv3x3(bias) -> bilinear resize, align_corners=True -> sum; skipped for one
    input), CRP (2 stages), output RCU (3 blocks if ``end`` else 1, 2 stages)."""

    def __init__(self, in_channels: Sequence[int], c, norm, pool, end=False):
        super().__init__(norm)
        self.adapt = nn.ModuleList(RCU(ci, 2, 2, norm) for ci in in_channels)
        multi = len(in_channels) > 1
        self.msf_norms = nn.ModuleList(self.norm(ci) for ci in in_channels) \
            if multi and norm is not None else None
        self.msf = nn.ModuleList(_conv(ci, c) for ci in in_channels) if multi else None
        self.crp = CRP(c, 2, norm, pool)
        self.out = RCU(c, 3 if end else 1, 2, norm)

    def forward(self, xs, y, size):
        hs = [a(x, y) for a, x in zip(self.adapt, xs)]
        if self.msf is None:
            h = hs[0]
        else:
            h = 0
            for i, (conv, x) in enumerate(zip(self.msf, hs)):
                x = conv(_apply(None if self.msf_norms is None else self.msf_norms[i], x, y))
                h = h + F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out(self.crp(h, y), y)


# ------------------------------------------------------------------------------------ network
class RefineNetDilated(nn.Module):
    """Score network s(x, y): x (B, C, H, W) in [0, 1], y (B,) long noise-level index in
    [0, n_levels) -> (B, C, H, W). ``version`` 1 (conditional, CondRefineNetDilated) or 2
    (NCSNv2: unconditional norms, output / sigmas[y]); see the module docstring."""

    def __init__(self, version: int = 1, *, ngf: int = 128, channels: int = 3,
                 sigmas: Sequence[float] | None = None):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        sched = NCSN_V1 if version == 1 else NCSN_V2
        sig = torch.tensor(sched.sigmas if sigmas is None else list(sigmas), dtype=torch.float32)
        self.version, self.ngf, self.channels, self.n_levels = version, ngf, channels, len(sig)
        self.register_buffer("sigmas", sig)
        cond = self.n_levels if version == 1 else None
        block_norm = lambda c: InstanceNormPlus(c, cond)  # noqa: E731
        refine_norm = block_norm if version == 1 else None  # v2's refine blocks have no norms
        pool = "avg" if version == 1 else "max"
        n2 = 2 * ngf
        self.begin_conv = _conv(channels, ngf)
        self.res1 = nn.ModuleList([ResBlock(ngf, ngf, block_norm), ResBlock(ngf, ngf, block_norm)])
        self.res2 = nn.ModuleList([ResBlock(ngf, n2, block_norm, down=True),
                                   ResBlock(n2, n2, block_norm)])
        self.res3 = nn.ModuleList([ResBlock(n2, n2, block_norm, down=True, dilation=2),
                                   ResBlock(n2, n2, block_norm, dilation=2)])
        self.res4 = nn.ModuleList([ResBlock(n2, n2, block_norm, down=True, dilation=4),
                                   ResBlock(n2, n2, block_norm, dilation=4)])
        self.refine1 = RefineBlock([n2], n2, refine_norm, pool)
        self.refine2 = RefineBlock([n2, n2], n2, refine_norm, pool)
        self.refine3 = RefineBlock([n2, n2], ngf, refine_norm, pool)
        self.refine4 = RefineBlock([ngf, ngf], ngf, refine_norm, pool, end=True)
        self.end_norm = block_norm(ngf)
        self.end_conv = _conv(ngf, channels)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"NCSN v{self.version} expects x of shape (B, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},) (noise-level "
                             f"index), got {tuple(y.shape)} {y.dtype}")
        h = self.begin_conv(2 * x - 1)
        layers = []
        for stage in (self.res1, self.res2, self.res3, self.res4):
            for blk in stage:
                h = blk(h, y)
            layers.append(h)
        l1, l2, l3, l4 = layers
        r = self.refine1([l4], y, l4.shape[2:])
        r = self.refine2([l3, r], y, l3.shape[2:])
        r = self.refine3([l2, r], y, l2.shape[2:])
        r = self.refine4([l1, r], y, l1.shape[2:])
        out = self.end_conv(F.elu(self.end_norm(r, y)))
        if self.version == 2:
            out = out / self.sigmas[y].to(out.dtype).view(-1, 1, 1, 1)
        return out


def ncsn_v1(**kw) -> RefineNetDilated:
    """NCSN v1 CIFAR-10 score network (ngf 128, 10 noise levels)."""
    return RefineNetDilated(1, **kw)


def ncsn_v2(**kw) -> RefineNetDilated:
    """NCSNv2 CIFAR-10 score network (ngf 128, 232 noise levels)."""
    return RefineNetDilated(2, **kw)


def count_flops(model: nn.Module, batch: int = 1, size: int = 32) -> int:
    """Forward FLOPs (2 per MAC, convs and matmuls) of ``model`` on a (batch, C, size, size) input,
    counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device's shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.rand(batch, model.channels, size, size, device=p.device, dtype=p.dtype)
    y = torch.zeros(batch, dtype=torch.long, device=p.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, y)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------ sampler
def geometric_sigmas(begin: float, end: float, n: int) -> tuple[float, ...]:
    """exp(linspace(log begin, log end, n)) in float64, as both releases compute them."""
    return tuple(math.exp(math.log(begin) + (math.log(end) - math.log(begin)) * i / (n - 1))
                 for i in range(n))


@dataclass(frozen=True)
class AnnealSchedule:
    """Annealed Langevin settings: ``steps_each`` steps at every sigma (largest first)."""

    sigmas: tuple[float, ...]
    steps_each: int
    step_lr: float
    denoise: bool
    name: str = ""

    def step_size(self, level: int) -> float:
        """step_i = step_lr * (sigma_i / sigma_L)^2."""
        return self.step_lr * (self.sigmas[level] / self.sigmas[-1]) ** 2

    def noise_std(self, level: int) -> float:
        return math.sqrt(2 * self.step_size(level))

    @property
    def evaluations(self) -> int:
        """Score-network evaluations per chain."""
        return len(self.sigmas) * self.steps_each + int(self.denoise)


NCSN_V1 = AnnealSchedule(geometric_sigmas(1.0, 0.01, 10), 100, 2e-5, False, "NCSN v1")
NCSN_V2 = AnnealSchedule(geometric_sigmas(50.0, 0.01, 232), 5, 6.2e-6, True, "NCSNv2")


@dataclass
class AnnealResult:
    """x: final sample (B, C, H, W) on its device; images: what the published loop copied to the
    host; evaluations: score-network calls made; levels: levels visited."""

    x: Tensor
    images: list
    evaluations: int
    levels: list


def init_uniform(batch: int, channels: int = 3, size: int = 32, *, device=None,
                 generator: torch.Generator | None = None) -> Tensor:
    """x0 ~ U[0, 1], (batch, channels, size, size): both releases' chain start."""
    return torch.rand(batch, channels, size, size, device=device, generator=generator)


@torch.no_grad()
def annealed_langevin(score: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                      schedule: AnnealSchedule, *, mode: str = "eager",
                      levels: Sequence[int] | None = None, steps_each: int | None = None,
                      generator: torch.Generator | None = None, guard: bool = True,
                      autocast_dtype: torch.dtype | None = None, callback=None) -> AnnealResult:
    """Annealed Langevin dynamics from ``x`` (B, C, H, W) (not modified).

    ``levels`` / ``steps_each`` run a subset of the chain (the timing harness measures a few steps
    per level and extrapolates: every step at a level is the same work). Per step the noise z is
    drawn (from ``generator``) before the score is evaluated. ``guard`` keeps a device-side record
    of the first level whose state went non-finite and raises :class:`FloatingPointError` at the
    end (one host sync per chain). ``callback({"level", "step", "step_size", "noise_std", "x"})``
    after every step.
    """
    if mode not in ("eager", "published"):
        raise ValueError(f"mode must be 'eager' or 'published', got {mode!r}")
    L = len(schedule.sigmas)
    levels = list(range(L)) if levels is None else [int(i) for i in levels]
    if any(not 0 <= i < L for i in levels):
        raise ValueError(f"levels must lie in [0, {L}), got {levels}")
    n_each = schedule.steps_each if steps_each is None else int(steps_each)
    published_v1 = mode == "published" and not schedule.denoise  # v1 copies every step
    published_v2 = mode == "published" and schedule.denoise      # v2 computes diagnostics
    dev, B = x.device, x.shape[0]
    ac = (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None
          else _nullcontext())

    def s(x, y):
        with ac:
            return score(x, y).to(x.dtype)

    x = x.clone()
    images, evals = [], 0
    first_bad = torch.full((), L, dtype=torch.int64, device=dev)
    for c in levels:
        if mode == "published":  # the released loops build the labels per level like this
            y = (torch.ones(B, device=dev) * c).long()
        else:
            y = torch.full((B,), c, dtype=torch.long, device=dev)
        step, std = schedule.step_size(c), schedule.noise_std(c)
        for k in range(n_each):
            if published_v1:
                images.append(torch.clamp(x, 0.0, 1.0).to("cpu"))
            z = torch.randn(x.shape, device=dev, dtype=x.dtype, generator=generator)
            g = s(x, y)
            evals += 1
            x = x + step * g + z * std
            if published_v2:  # per-step diagnostics of the released v2 loop, left on the device
                gn = g.flatten(1).norm(dim=-1).mean()
                zn = z.flatten(1).norm(dim=-1).mean()
                diag = (x.flatten(1).norm(dim=-1).mean(),                       # image norm
                        math.sqrt(step / 2.0) * gn / zn,                          # snr
                        g.mean(0).flatten().norm() ** 2 * schedule.sigmas[c] ** 2)
                del diag  # computed, never read: exactly what the released loop costs
            if callback is not None:
                callback({"level": c, "step": k, "step_size": step, "noise_std": std, "x": x})
        if guard:
            bad = ~torch.isfinite(x).all()
            first_bad = torch.where(bad & (first_bad == L), torch.tensor(c, device=dev), first_bad)
    if schedule.denoise:
        y = torch.full((B,), L - 1, dtype=torch.long, device=dev)
        x = x + schedule.sigmas[-1] ** 2 * s(x, y)
        evals += 1
        if guard:
            bad = ~torch.isfinite(x).all()
            first_bad = torch.where(bad & (first_bad == L), torch.tensor(L - 1, device=dev),
                                    first_bad)
    if mode == "published":
        images.append(x.to("cpu"))
    if guard:
        fb = int(first_bad)
        if fb < L:
            raise FloatingPointError(
                f"{schedule.name or 'annealed Langevin'}: the chain became non-finite (NaN/Inf) at "
                f"noise level {fb} (sigma={schedule.sigmas[fb]:.4g}); check the score network")
    return AnnealResult(x, images, evals, levels)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
