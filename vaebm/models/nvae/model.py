"""NVAE (Vahdat & Kautz 2020) with the Gaussian decoder VAEBM uses, behind the eps-space contract.

Generative path T (paper Eq. 8; group 0 is the coarsest, decoder order):

    s = prior_ftr0;  for group l:  (mu_l, log sigma_l) = dec_sampler(s)   (l = 0: 0 and 0)
        mu'_l = 5 tanh(mu_l / 5),  sigma_l = (exp(5 tanh(log sigma_l / 5)) + 0.01) * t
        z_l = mu'_l + sigma_l * eps_l,  s = dec_tower cells(combiner(s, z_l))
    (mu_x, log sigma_x) = image_conditional(post_process(s)), soft-clamped the same way
    x = clamp(mu'_x + sigma_x * eps_x, -1, 1) / 2 + 1/2        (x in [0, 1]; not tempered)

log p(z) uses the tempered sigma_l (as the published code): log N(z_l; mu'_l, sigma_l) summed;
log p(x|z) is the density of the [-1, 1]-scaled sample with log sigma_x clamped >= -2 (FACTS sec.
1). All densities of x are those of the [-1, 1]-scaled image, as in NVAE/VAEBM; add
:attr:`NVAE.x_scale_log_det` (= D log 2) for the density of the [0, 1] image.

Posterior (encoder): residual normal q_l = N(mu_p + mu_q, log sigma_p + log sigma_q) in raw
parameters, soft-clamped after the sum; optional volume-preserving IAF cells on the posterior
sample. Module and parameter names follow the published code (see cells.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..eps_space import EpsDecode, sample_eps
from .cells import (ARCH_INSTANCES, CHANNEL_MULT, Cell, Conv2D, DecCombinerCell, EncCombinerCell,
                    InvertedResidual, soft_clamp5, to_sync_batchnorm)
from . import regularizers
from .flows import PairedCellAR
from .presets import NVAEConfig, get_config

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG_SIGMA_X_MIN = -2.0  # clamp of the decoder log-scale inside the energy's likelihood term


def _normal_params(mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Soft-clamped mean and std: (5 tanh(mu/5), exp(5 tanh(log_sigma/5)) + 0.01)."""
    return soft_clamp5(mu), torch.exp(soft_clamp5(log_sigma)) + 0.01


def _gauss_log_p(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """Elementwise log N(z; mu, sigma^2)."""
    e = (z - mu) / sigma
    return -0.5 * e * e - torch.log(sigma) - HALF_LOG_2PI


def _f32(x: Tensor) -> Tensor:
    """Half / bfloat16 -> float32 (sums of log-densities); float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl_normal(mu_q: Tensor, sig_q: Tensor, mu_p: Tensor, sig_p: Tensor) -> Tensor:
    """Elementwise KL(N(mu_q, sig_q^2) || N(mu_p, sig_p^2))."""
    a = (mu_q - mu_p) / sig_p
    r = sig_q / sig_p
    return 0.5 * (a * a + r * r) - 0.5 - torch.log(r)


class NVAE(nn.Module):
    """Hierarchical VAE with Gaussian decoder. ``NVAE("cifar10")``, ``NVAE("tiny")``, or an
    :class:`NVAEConfig` plus field overrides. Public images are (B, C, H, W) in [0, 1].

    Attributes: ``config``, ``groups_per_scale`` (finest first), ``latent_shapes`` (per group,
    decoder order, without batch), ``group_scale`` (scale index of each group, 0 = coarsest).
    """

    def __init__(self, config: str | NVAEConfig = "cifar10", **overrides):
        super().__init__()
        cfg = get_config(config, **overrides)
        if cfg.arch_instance not in ARCH_INSTANCES:
            raise ValueError(f"unknown arch_instance {cfg.arch_instance!r}; "
                             f"known: {sorted(ARCH_INSTANCES)}")
        self.config = cfg
        self.arch_instance = ARCH_INSTANCES[cfg.arch_instance]
        self.use_se, self.res_dist = cfg.use_se, cfg.res_dist
        self.num_latent_scales = cfg.num_latent_scales
        self.num_latent_per_group = cfg.num_latent_per_group
        self.groups_per_scale = cfg.groups_per_scale
        self.num_flows = cfg.num_nf
        self.with_nf = cfg.num_nf > 0
        self.input_size = cfg.model_size
        self._pad = (cfg.model_size - cfg.image_size) // 2
        self._pad_extra = cfg.model_size - cfg.image_size - self._pad  # odd differences
        Ce, Cd = cfg.num_channels_enc, cfg.num_channels_dec
        self.num_channels_enc, self.num_channels_dec = Ce, Cd

        ds = cfg.downsample
        top = self.input_size // ds
        self.prior_ftr0 = nn.Parameter(torch.rand(int(Cd * ds), top, top))
        self.z0_size = [cfg.num_latent_per_group, top, top]

        self.stem = Conv2D(cfg.in_channels, Ce, 3, padding=1, bias=True)
        self.pre_process, mult = self._init_pre_process(1)
        self.enc_tower, mult = self._init_encoder_tower(mult)
        self.enc0 = nn.Sequential(nn.ELU(), Conv2D(int(Ce * mult), int(Ce * mult), 1, bias=True),
                                  nn.ELU())
        self.enc_sampler, self.dec_sampler, self.nf_cells = self._init_samplers(mult)
        self.dec_tower, mult = self._init_decoder_tower(mult)
        self.post_process, mult = self._init_post_process(mult)
        self.image_conditional = nn.Sequential(
            nn.ELU(), Conv2D(int(Cd * mult), 2 * cfg.in_channels, 3, padding=1, bias=True))

        # latent layout, decoder order (coarsest scale first)
        L = cfg.num_latent_scales
        self.latent_shapes, self.group_scale = [], []
        for s in range(L):
            hw = self.input_size // 2 ** (cfg.num_preprocess_blocks + L - 1 - s)
            for _ in range(self.groups_per_scale[L - 1 - s]):
                self.latent_shapes.append((cfg.num_latent_per_group, hw, hw))
                self.group_scale.append(s)
        self.num_groups = len(self.latent_shapes)

        self._sr_warm = False
        self._frozen = False
        self._channels_last = False
        self.register_load_state_dict_post_hook(NVAE._after_load)

    # ------------------------------------------------------------------ construction
    def _cell(self, Cin, Cout, cell_type):
        return Cell(Cin, Cout, cell_type, self.arch_instance[cell_type], self.use_se)

    def _init_pre_process(self, mult):
        cfg, cells = self.config, nn.ModuleList()
        for _ in range(cfg.num_preprocess_blocks):
            for c in range(cfg.num_preprocess_cells):
                C = int(self.num_channels_enc * mult)
                if c == cfg.num_preprocess_cells - 1:
                    cells.append(self._cell(C, CHANNEL_MULT * C, "down_pre"))
                    mult *= CHANNEL_MULT
                else:
                    cells.append(self._cell(C, C, "normal_pre"))
        return cells, mult

    def _init_encoder_tower(self, mult):
        cfg, cells = self.config, nn.ModuleList()
        L = cfg.num_latent_scales
        for s in range(L):
            G = self.groups_per_scale[s]
            for g in range(G):
                C = int(self.num_channels_enc * mult)
                for _ in range(cfg.num_cell_per_cond_enc):
                    cells.append(self._cell(C, C, "normal_enc"))
                if not (s == L - 1 and g == G - 1):
                    cells.append(EncCombinerCell(C, int(self.num_channels_dec * mult), C,
                                                 "combiner_enc"))
            if s < L - 1:
                C = int(self.num_channels_enc * mult)
                cells.append(self._cell(C, CHANNEL_MULT * C, "down_enc"))
                mult *= CHANNEL_MULT
        return cells, mult

    def _init_samplers(self, mult):
        cfg = self.config
        enc_s, dec_s, nf = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        Z, L = cfg.num_latent_per_group, cfg.num_latent_scales
        for s in range(L):
            for g in range(self.groups_per_scale[L - s - 1]):
                Ce = int(self.num_channels_enc * mult)
                enc_s.append(Conv2D(Ce, 2 * Z, 3, padding=1, bias=True))
                for _ in range(cfg.num_nf):
                    nf.append(PairedCellAR(Z, Ce))
                if not (s == 0 and g == 0):  # group 0 has the fixed N(0, 1.01^2) prior
                    Cd = int(self.num_channels_dec * mult)
                    dec_s.append(nn.Sequential(nn.ELU(), Conv2D(Cd, 2 * Z, 1, bias=True)))
            mult /= CHANNEL_MULT
        return enc_s, dec_s, nf

    def _init_decoder_tower(self, mult):
        cfg, cells = self.config, nn.ModuleList()
        L = cfg.num_latent_scales
        for s in range(L):
            for g in range(self.groups_per_scale[L - s - 1]):
                C = int(self.num_channels_dec * mult)
                if not (s == 0 and g == 0):
                    for _ in range(cfg.num_cell_per_cond_dec):
                        cells.append(self._cell(C, C, "normal_dec"))
                cells.append(DecCombinerCell(C, cfg.num_latent_per_group, C, "combiner_dec"))
            if s < L - 1:
                C = int(self.num_channels_dec * mult)
                cells.append(self._cell(C, int(C / CHANNEL_MULT), "up_dec"))
                mult /= CHANNEL_MULT
        return cells, mult

    def _init_post_process(self, mult):
        cfg, cells = self.config, nn.ModuleList()
        for _ in range(cfg.num_postprocess_blocks):
            for c in range(cfg.num_postprocess_cells):
                C = int(self.num_channels_dec * mult)
                if c == 0:
                    cells.append(self._cell(C, int(C / CHANNEL_MULT), "up_post"))
                    mult /= CHANNEL_MULT
                else:
                    cells.append(self._cell(C, C, "normal_post"))
        return cells, mult

    # ------------------------------------------------------------------ checks and shapes
    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def x_scale_log_det(self) -> float:
        """D log 2: add to a log-density of the [-1, 1]-scaled image for the [0, 1] image."""
        c = self.config
        return c.in_channels * c.image_size ** 2 * math.log(2.0)

    def eps_shapes(self, batch: int) -> list[torch.Size]:
        """One (B, Z, H_l, W_l) per latent group (decoder order), then eps_x (B, C, H, W)."""
        return [torch.Size((batch, *s)) for s in self.latent_shapes] + \
            [torch.Size((batch, *self.image_shape))]

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if tuple(x.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(f"expected images of shape (B, {c}, {h}, {w}) for this NVAE, got "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images in [0, 1], got dtype {x.dtype}")

    def _check_eps(self, eps: Sequence[Tensor]) -> int:
        if len(eps) != self.num_groups + 1:
            raise ValueError(f"expected {self.num_groups + 1} eps tensors ({self.num_groups} "
                             f"latent groups + eps_x), got {len(eps)}")
        B = eps[0].shape[0]
        for i, (e, s) in enumerate(zip(eps, self.eps_shapes(B))):
            if tuple(e.shape) != tuple(s):
                raise ValueError(f"eps[{i}] has shape {tuple(e.shape)}, expected {tuple(s)}")
        return B

    def _to_model(self, x: Tensor) -> Tensor:
        """[0, 1] data -> [-1, 1] at the model's size (zero padding in [0, 1])."""
        if self._pad or self._pad_extra:
            x = F.pad(x, (self._pad, self._pad_extra, self._pad, self._pad_extra))
        return 2 * x - 1.0

    def _crop(self, t: Tensor) -> Tensor:
        if self._pad or self._pad_extra:
            n = self.config.image_size
            return t[:, :, self._pad:self._pad + n, self._pad:self._pad + n]
        return t

    def _decoder_dist(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits (B, 2C, H', W') -> cropped (mu', log sigma' soft-clamped, sigma), float32."""
        logits = _f32(self._crop(logits))
        mu, ls = logits.chunk(2, dim=1)
        mu, ls = soft_clamp5(mu), soft_clamp5(ls)
        return mu, ls, torch.exp(ls) + 0.01

    # ------------------------------------------------------------------ towers
    def _run_decoder(self, batch: int, group_fn) -> Tensor:
        """Walk the decoder; ``group_fn(idx, s)`` returns z for latent group idx given the
        decoder state s. Returns the logits (B, 2C, H', W') at model size."""
        s = self.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1)
        if self._channels_last:
            s = s.contiguous(memory_format=torch.channels_last)
        idx = 0
        for cell in self.dec_tower:
            if cell.cell_type == "combiner_dec":
                s = cell(s, group_fn(idx, s))
                idx += 1
            else:
                s = cell(s)
        for cell in self.post_process:
            s = cell(s)
        return self.image_conditional(s)

    def _prior(self, idx: int, s: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (mu, log sigma) of the prior of group idx >= 1 from the decoder state."""
        return self.dec_sampler[idx - 1](s).chunk(2, dim=1)

    def _encoder(self, x: Tensor):
        """x in [0, 1] -> (top feature, [(combiner cell, saved feature)] in decoder order)."""
        s = self.stem(self._to_model(x))
        for cell in self.pre_process:
            s = cell(s)
        combiners = []
        for cell in self.enc_tower:
            if cell.cell_type == "combiner_enc":
                combiners.append((cell, s))
            else:
                s = cell(s)
        combiners.reverse()
        return s, combiners

    # ------------------------------------------------------------------ eps-space contract
    def decode_eps(self, eps: Sequence[Tensor], *, t: float = 1.0,
                   with_log_prob: bool = False) -> EpsDecode:
        """T(eps): eps (list of (B, Z, H_l, W_l) per group, then eps_x (B, C, H, W)) ->
        :class:`EpsDecode` with x_sample, x_mean (B, C, H, W) in [0, 1] scale and, with
        ``with_log_prob``, log_p_z and log_p_x (B,). Deterministic and differentiable in eps;
        no host synchronisation."""
        B = self._check_eps(eps)
        lp_terms: list[Tensor] = []
        log_t = math.log(t) if t > 0 else float("-inf")

        def group_fn(idx, s):
            e = eps[idx]
            if idx == 0:
                sig0 = 1.01 * t
                if with_log_prob:
                    ef = _f32(e)
                    lp_terms.append(-0.5 * ef.square().sum((1, 2, 3))
                                    - e[0].numel() * (math.log(1.01) + log_t + HALF_LOG_2PI))
                return e * sig0
            mu, ls = self._prior(idx, s)
            mu, ls = soft_clamp5(mu), soft_clamp5(ls)
            sigma = (torch.exp(ls) + 0.01) * t
            if with_log_prob:
                # log N(mu + sigma e; mu, sigma) = -e^2/2 - log sigma - log(2 pi)/2, exactly
                ef = _f32(e)
                lp_terms.append((-0.5 * ef.square() - torch.log(_f32(sigma))).sum((1, 2, 3))
                                - e[0].numel() * HALF_LOG_2PI)
            return mu + sigma * e

        logits = self._run_decoder(B, group_fn)
        mu, ls, sigma = self._decoder_dist(logits)
        xc = torch.clamp(mu + sigma * _f32(eps[-1]), -1.0, 1.0)
        x_sample, x_mean = xc * 0.5 + 0.5, mu * 0.5 + 0.5
        if not with_log_prob:
            return EpsDecode(x_sample, x_mean, None, None)
        log_p_z = torch.stack(lp_terms, 0).sum(0)
        sigma1 = torch.exp(torch.clamp(ls, min=LOG_SIGMA_X_MIN)) + 0.01
        log_p_x = _gauss_log_p(xc, mu, sigma1).sum((1, 2, 3))
        return EpsDecode(x_sample, x_mean, log_p_z, log_p_x)

    def _posterior(self, x: Tensor, *, use_mean: bool = False,
                   generator: torch.Generator | None = None, t: float = 1.0,
                   noise: Sequence[Tensor] | None = None) -> dict:
        """One pass x -> q(z|x) -> p(x|z): per group z (after flows), log q, log p, kl (each
        (B,)), eps of z through the prior at temperature t; plus the decoder's logits.
        ``noise``: the posterior's standard-normal draws per group (default: fresh ones)."""
        self._check_x(x)
        B = x.shape[0]
        s_top, combiners = self._encoder(x)
        out = {"z": [], "log_q": [], "log_p": [], "kl": [], "eps": []}

        def noise_like(m, idx):
            if noise is not None:
                return noise[idx].to(m.dtype)
            if use_mean:
                return torch.zeros_like(m)
            return torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)

        def group_fn(idx, s):
            if idx == 0:
                ftr = self.enc0(s_top)
                mu_q, ls_q = self.enc_sampler[0](ftr).chunk(2, dim=1)
                mu_p = torch.zeros_like(mu_q)
                sig_p = torch.full_like(mu_q, 1.01)
            else:
                mu_p_raw, ls_p_raw = self._prior(idx, s)
                cell, feat = combiners[idx - 1]
                ftr = cell(feat, s)
                mu_q, ls_q = self.enc_sampler[idx](ftr).chunk(2, dim=1)
                if self.res_dist:
                    mu_q, ls_q = mu_p_raw + mu_q, ls_p_raw + ls_q
                mu_p, sig_p = _normal_params(mu_p_raw, ls_p_raw)
            mu_q, sig_q = _normal_params(mu_q, ls_q)
            z = mu_q + sig_q * noise_like(mu_q, idx)
            log_q = _gauss_log_p(z, mu_q, sig_q)
            for n in range(self.num_flows):
                z, log_det = self.nf_cells[idx * self.num_flows + n](z, ftr)
                log_q = log_q - log_det
            log_p = _gauss_log_p(z, mu_p, sig_p)
            kl = log_q - log_p if self.with_nf else _kl_normal(mu_q, sig_q, mu_p, sig_p)
            out["z"].append(z)
            out["log_q"].append(log_q.sum((1, 2, 3)))
            out["log_p"].append(log_p.sum((1, 2, 3)))
            out["kl"].append(kl.sum((1, 2, 3)))
            out["eps"].append((z - mu_p) / (sig_p * t))
            return z

        out["logits"] = self._run_decoder(B, group_fn)
        return out

    def encode_eps(self, x: Tensor, *, use_mean: bool = False,
                   generator: torch.Generator | None = None, t: float = 1.0) -> list[Tensor]:
        """x (B, C, H, W) in [0, 1] -> eps with T(eps) == (z, x): each group's posterior mean
        (``use_mean``) or sample, mapped through its prior's shift and scale (at temperature t),
        and eps_x = (2x - 1 - mu_x) / sigma_x for the decoder at those z."""
        out = self._posterior(x, use_mean=use_mean, generator=generator, t=t)
        mu, _, sigma = self._decoder_dist(out["logits"])
        eps_x = ((2 * _f32(x) - 1.0) - mu) / sigma
        return out["eps"] + [eps_x.to(x.dtype)]

    # ------------------------------------------------------------------ stage-1 contract
    def loss_terms(self, x: Tensor, *, generator: torch.Generator | None = None) -> dict:
        """One reparameterised pass: {"log_p_x": (B,), "kl": [(B,) per group], "log_q": (B,),
        "log_p_z": (B,)}; -ELBO = -log_p_x + sum(kl). log_p_x = log N(2x - 1; mu_x, sigma_x)
        (no clamp, as NVAE trains); KL analytic without flows, log q - log p with them."""
        out = self._posterior(x, generator=generator)
        mu, _, sigma = self._decoder_dist(out["logits"])
        log_p_x = _gauss_log_p(2 * _f32(x) - 1.0, mu, sigma).sum((1, 2, 3))
        return {"log_p_x": log_p_x, "kl": out["kl"],
                "log_q": torch.stack(out["log_q"]).sum(0),
                "log_p_z": torch.stack(out["log_p"]).sum(0)}

    def forward(self, x: Tensor) -> dict:
        """:meth:`loss_terms` (so DistributedDataParallel, which calls forward, syncs it)."""
        return self.loss_terms(x)

    @torch.no_grad()
    def iwae(self, x: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Importance-weighted bound log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q; (B,) nats of
        the [-1, 1]-scaled image (add :attr:`x_scale_log_det` for the [0, 1] image)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        logw = []
        for _ in range(k):
            t = self.loss_terms(x, generator=generator)
            logw.append(t["log_p_x"] + t["log_p_z"] - t["log_q"])
        return torch.logsumexp(torch.stack(logw), 0) - math.log(k)

    def regularizers(self) -> dict:
        """{"spectral": sum over convs of the largest singular value of the (normalised) weight
        as (C_out, C_in/groups*k*k), by batched power iteration with persistent u/v (4 steps;
        40 at first use); "bn": sum over BN layers of max |gamma|} (the NVAE regularisers)."""
        return {"spectral": self.spectral_norm_loss(), "bn": self.batchnorm_loss()}

    def _conv_layers(self) -> list[Conv2D]:
        return [m for m in self.modules() if isinstance(m, Conv2D)]

    def _bn_layers(self, modules=None) -> list[_BatchNorm]:
        root = self if modules is None else modules
        return [m for m in root.modules() if isinstance(m, _BatchNorm)]

    def convert_sync_batchnorm(self, process_group=None) -> "NVAE":
        """Synchronised BN for multi-process training (in place; use this rather than
        ``nn.SyncBatchNorm.convert_sync_batchnorm``, which drops the fused Swish)."""
        self.unfreeze()
        to_sync_batchnorm(self, process_group)
        return self

    def spectral_norm_loss(self) -> Tensor:
        return regularizers.spectral_norm_loss(self._conv_layers(), self)

    def batchnorm_loss(self) -> Tensor:
        return regularizers.batchnorm_loss(self._bn_layers())

    @staticmethod
    def _after_load(module: "NVAE", incompatible_keys) -> None:
        # one sync at load time: u/v from a checkpoint are warm unless they were never set
        us = [m.sr_u.abs().sum() for m in module._conv_layers() if not m.sr_u.is_meta]
        module._sr_warm = bool(torch.stack(us).gt(0).all()) if us else False
        if module._frozen:
            module.unfreeze()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, t: float = 1.0, *, generator: torch.Generator | None = None,
               mean: bool = True) -> Tensor:
        """n images (n, C, H, W) in [0, 1] from the VAE at temperature t: the decoder mean
        clamped to [0, 1] (``mean``, the published test-time output) or the noisy sample."""
        p = self.prior_ftr0
        eps = sample_eps(self, n, device=p.device, dtype=p.dtype, generator=generator)
        out = self.decode_eps(eps, t=t)
        return out.x_mean.clamp(0.0, 1.0) if mean else out.x_sample

    @torch.no_grad()
    def readjust_bn(self, num_batches: int = 100, batch_size: int = 64, t: float = 1.0, *,
                    generator: torch.Generator | None = None) -> dict:
        """Re-estimate the running statistics of the decoder's BN layers from samples at
        temperature t (NVAE's readjust_bn, paper App. E): reset them, run ``num_batches``
        sampling passes in train mode, keep the exact average (momentum None). The encoder's
        statistics are untouched. Returns the previous statistics as a state dict fragment
        (``model.load_state_dict(old, strict=False)`` restores them). Leaves the model in eval."""
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.unfreeze()
        names = {id(m): n for n, m in self.named_modules()}
        bns = self._bn_layers(self.dec_tower) + self._bn_layers(self.post_process)
        old = {}
        for bn in bns:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                old[f"{names[id(bn)]}.{key}"] = getattr(bn, key).clone()
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the passes
        self.train()
        try:
            p = self.prior_ftr0
            for _ in range(num_batches):
                eps = sample_eps(self, batch_size, device=p.device, dtype=p.dtype,
                                 generator=generator)
                self.decode_eps(eps, t=t)
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
            self.eval()
        return old

    # ------------------------------------------------------------------ fast sampling mode
    def freeze(self, channels_last: bool = False) -> "NVAE":
        """Sampling mode: eval(), weight norms computed once and cached, BN folded into the
        decoder's inverted-residual convs. Stale if parameters or BN statistics change; any
        ``train()`` call or state-dict load unfreezes."""
        self.eval()
        for m in self.modules():
            if isinstance(m, Conv2D):
                m.freeze(channels_last=channels_last)
        for m in self.modules():
            if isinstance(m, InvertedResidual):
                m.freeze(channels_last=channels_last)
        self._frozen, self._channels_last = True, channels_last
        return self

    def unfreeze(self) -> "NVAE":
        for m in self.modules():
            if isinstance(m, InvertedResidual):
                m.unfreeze()
            elif isinstance(m, Conv2D):
                m.unfreeze()
        self._frozen, self._channels_last = False, False
        return self

    @property
    def is_frozen(self) -> bool:
        return self._frozen

    @contextlib.contextmanager
    def frozen(self, channels_last: bool = False):
        """``with vae.frozen(): ...`` runs in sampling mode and restores the previous mode."""
        was_training, was_frozen, was_cl = self.training, self._frozen, self._channels_last
        self.freeze(channels_last)
        try:
            yield self
        finally:
            self.unfreeze()
            if was_frozen:
                self.freeze(was_cl)
            self.train(was_training)

    def train(self, mode: bool = True) -> "NVAE":
        if mode and self._frozen:
            self.unfreeze()
        return super().train(mode)

    def extra_repr(self) -> str:
        c = self.config
        return (f"image={c.in_channels}x{c.image_size}x{c.image_size}, groups={self.num_groups}, "
                f"latent={c.num_latent_per_group}, scales={c.num_latent_scales}, nf={c.num_nf}")
