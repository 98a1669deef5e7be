"""The pieces sample_speed.py (and bench_scaling.py, the preset benchmarks) measure with: the
stand-in VAE (no NVAE needed), model builders, freeze helpers, peak-memory and evaluation
counters, and the precision policy."""

from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaebm.models import EnergyNet
from vaebm.models.eps_space import EpsDecode
from vaebm.models.layers import WNConv2d

# --------------------------------------------------------------------------- stand-in VAE
class StandInVAE(nn.Module):
    """NOT NVAE: a small hierarchical conv VAE following the eps-space contract, used until (or
    instead of, with ``--vae standin``) the real backbone. Same chain state as NVAE cifar10:
    ``groups`` tensors (B, z_ch, z_res, z_res) then eps_x (B, 3, 2 z_res, 2 z_res)."""

    def __init__(self, groups=30, z_ch=20, z_res=16, ch=32, img_ch=3):
        super().__init__()
        self.groups, self.z_ch, self.z_res, self.img_ch = groups, z_ch, z_res, img_ch
        self.h0 = nn.Parameter(0.1 * torch.randn(1, ch, z_res, z_res))
        self.prior = nn.ModuleList(WNConv2d(ch, 2 * z_ch, 3) for _ in range(groups))
        self.merge = nn.ModuleList(WNConv2d(z_ch, ch, 1) for _ in range(groups))
        self.out = WNConv2d(ch, 2 * img_ch, 3)

    def eps_shapes(self, batch):
        r = self.z_res
        return ([torch.Size((batch, self.z_ch, r, r))] * self.groups
                + [torch.Size((batch, self.img_ch, 2 * r, 2 * r))])

    def decode_eps(self, eps, *, t=1.0, with_log_prob=False):
        B = eps[0].shape[0]
        h = self.h0.expand(B, -1, -1, -1)
        log_pz = 0.0
        for prior, merge, e in zip(self.prior, self.merge, eps[:-1]):
            mu, ls = prior(F.silu(h)).chunk(2, 1)
            sig = torch.exp(5 * torch.tanh(ls / 5)) + 0.01
            z = mu + sig * t * e
            if with_log_prob:
                log_pz = log_pz + (-0.5 * e.square() - sig.log()
                                   - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))
            h = h + merge(z)
        mu_x, ls_x = self.out(F.interpolate(h, scale_factor=2)).chunk(2, 1)
        mu_x, ls_x = 5 * torch.tanh(mu_x / 5), 5 * torch.tanh(ls_x / 5)
        x = torch.clamp(mu_x + ls_x.exp() * eps[-1], -1, 1)
        log_px = None
        if with_log_prob:
            ls_c = ls_x.clamp(min=-2)
            log_px = (-0.5 * ((x - mu_x) / ls_c.exp()).square() - ls_c
                      - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))
        return EpsDecode((x + 1) / 2, (mu_x.clamp(-1, 1) + 1) / 2,
                         log_pz if with_log_prob else None, log_px)

    def encode_eps(self, x, *, use_mean=False, generator=None):
        raise NotImplementedError("the stand-in VAE only decodes")

    def freeze(self, channels_last=False):
        for m in self.modules():
            if isinstance(m, WNConv2d):
                m.freeze(channels_last)
        return self

    def unfreeze(self):
        for m in self.modules():
            if isinstance(m, WNConv2d):
                m.unfreeze()
        return self


def build_vae(preset, kind, device):
    """(vae, description). ``kind``: auto (NVAE if importable), nvae, standin."""
    if kind in ("auto", "nvae"):
        try:
            from vaebm.models.nvae import NVAE
        except ImportError as e:
            if kind == "nvae":
                raise SystemExit(f"--vae nvae: vaebm.models.nvae is not importable ({e})")
        else:
            torch.manual_seed(0)
            return NVAE(preset).to(device).eval(), f"NVAE({preset!r})"
    tiny = preset == "tiny"
    vae = StandInVAE(groups=3, z_ch=4, z_res=4, ch=8) if tiny else StandInVAE()
    return vae.to(device).eval(), f"stand-in VAE (NOT NVAE){', tiny' if tiny else ''}"


def build_energy(preset, device, seed=0):
    """EnergyNet(preset) after data-dependent init on uniform noise (realistic weight scales)."""
    torch.manual_seed(seed)
    net = EnergyNet(preset).to(device)
    net.data_init([torch.rand(4, net.in_channels, net.resolution, net.resolution, device=device)])
    return net.eval()


def _freeze(m, channels_last):
    if not hasattr(m, "freeze"):
        return
    if "channels_last" in inspect.signature(m.freeze).parameters:
        m.freeze(channels_last=channels_last)
    else:
        m.freeze()


def _unfreeze(m):
    if hasattr(m, "unfreeze"):
        m.unfreeze()


# --------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory of a block. CUDA: torch.cuda.max_memory_allocated (reset at entry). CPU: the
    process's peak resident set VmHWM, reset at entry through /proc/self/clear_refs (Linux);
    where that is refused, ru_maxrss (process lifetime peak, marked as such)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = self.base = float("nan")
        self.kind = "cuda max_memory_allocated"

    @staticmethod
    def _status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
            self.kind = "CPU peak RSS (VmHWM, reset per row)"
        except (OSError, KeyError):
            self.base = float("nan")
            self.kind = "CPU ru_maxrss (process-lifetime peak)"
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif "VmHWM" in self.kind:
            self.peak = self._status("VmHWM")
        else:
            import resource
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False

    def row(self):
        mib = 2**20
        return {"peak_mem_MiB": self.peak / mib, "mem_delta_MiB": (self.peak - self.base) / mib,
                "mem_kind": self.kind}


class EvalCounter:
    """Counts samples through a module's forward (a hook): evaluations x batch."""

    def __init__(self, module):
        self.samples = 0
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.samples += args[0].shape[0]

    def close(self):
        self._h.remove()


def precision_context(precision, device):
    """Apply the policy to matmul/conv flags; return the autocast dtype (or None)."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the released NCSN v1 main.py
    return torch.bfloat16 if precision == "bf16" else None


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
