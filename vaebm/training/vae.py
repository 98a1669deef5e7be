"""Stage 1 of VAEBM: train the VAE on -ELBO the NVAE way (paper Sec. 3.1; FACTS sec. 3).

Per iteration (global step ``it`` of ``T``), with ``vae.loss_terms(x)`` giving log p(x|z) (B,)
and one KL (B,) per latent group::

    beta(it)  = max(min((it - c T) / (a T), 1), beta_min)        KL warm-up (a = 0.3, c = 1e-4)
    gamma_l   = NVAE's KL balancing while beta < 1, else 1      (see :func:`kl_balance_coeffs`)
    loss      = mean(-log p(x|z) + beta * sum_l gamma_l KL_l) + lambda * (spectral + bn)
    lambda    = wdn, or exp((1 - beta) log wdn_init + beta log wdn) with ``wdn_anneal``
    lr(it)    = lr * (it + 1) / W for it < W, then cosine from lr to lr_min over T - W

Adamax (eps 1e-3, coupled weight decay 3e-4). Mixed precision: fp16 autocast + GradScaler on
CUDA (on by default there), bf16 autocast on CPU (off by default). Checkpoints resume exactly.

Evaluation: bits per dimension from the IWAE bound, bpd = -log p(x) / (D ln 2) + n_bits. The
``+ n_bits`` is the [0, 1]-to-discrete correction: a density p on [0, 1]^D of images with
2^n_bits levels (pixels k / (2^n - 1), dequantised uniformly to bins of width 2^-n) gives the
discrete model P(k) >= p(x) 2^(-n D), i.e. -log2 P <= -log2 p + n D. ``n_bits=None`` reports
the continuous -log p(x) / (D ln 2) only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import (CheckpointError, DivergenceGuard, capture_rng, load_latest,
                         restore_rng, save_checkpoint)
from .config import VAEConfig, to_dict
from .ebm import DataError, check_batch
from .loop import TrainLoop

__all__ = ["VAETrainer", "train_vae", "kl_coeff", "kl_balance_coeffs", "group_alpha",
           "lr_at", "wdn_coeff", "bits_per_dim", "evaluate_bpd", "load_vae_weights"]

CKPT_NAME = "vae.pt"


# --------------------------------------------------------------------------- schedules
def kl_coeff(it: int, total: int, anneal_portion: float = 0.3, const_portion: float = 1e-4,
             min_coeff: float = 1e-4) -> float:
    """NVAE's KL warm-up: held at ``min_coeff`` for ``const_portion * total`` iterations, then
    linear to 1 over ``anneal_portion * total``; never below ``min_coeff``."""
    anneal = max(anneal_portion * total, 1e-12)
    return max(min((it - const_portion * total) / anneal, 1.0), min_coeff)


def lr_at(it: int, cfg: VAEConfig, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` iterations, then cosine decay from lr to lr_min."""
    if it < warmup:
        return cfg.lr * (it + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (it - warmup) / span)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))


def wdn_coeff(beta: float, cfg: VAEConfig) -> float:
    """Regulariser weight lambda: constant, or log-linear from wdn_init (beta 0) to wdn (beta 1)."""
    if not cfg.wdn_anneal:
        return cfg.wdn
    return math.exp((1 - beta) * math.log(cfg.wdn_init) + beta * math.log(cfg.wdn))


def group_alpha(vae, device=None) -> torch.Tensor:
    """Group size factors alpha_l for KL balancing, min 1: ``vae.kl_alpha`` when the model has
    it, else from ``eps_shapes``: alpha_l = (H_l W_l) / (number of groups with that H_l W_l),
    NVAE's 'square' rule (4^s / groups at scale s) when scales double; 1 for flat latents."""
    a = getattr(vae, "kl_alpha", None)
    if a is None:
        if not hasattr(vae, "eps_shapes"):
            return None
        shapes = vae.eps_shapes(1)[:-1]
        areas = [math.prod(s[2:]) if len(s) > 2 else 1 for s in shapes]
        counts = {ar: areas.count(ar) for ar in set(areas)}
        a = [ar / counts[ar] for ar in areas]
    a = torch.as_tensor(a, dtype=torch.float32, device=device)
    return a / a.min()


def kl_balance_coeffs(kl: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """NVAE's balancing: kl (B, L) per-sample group KLs -> coefficients gamma (L,), mean 1,
    gamma_l proportional to (mean_b |KL_bl| + 0.01) / alpha_l; detached (a weighting only)."""
    mag = kl.detach().abs().mean(0) + 0.01
    if alpha is None:
        alpha = torch.ones_like(mag)
    g = mag / alpha.to(mag)
    return (g / g.mean()).detach()


def bits_per_dim(log_px: torch.Tensor, dims: int, n_bits: int | None = 8) -> torch.Tensor:
    """bpd = -log p(x) / (D ln 2) (+ n_bits for [0, 1] images of 2^n_bits levels; module doc)."""
    bpd = -log_px / (dims * math.log(2))
    return bpd + n_bits if n_bits is not None else bpd


@torch.no_grad()
def evaluate_bpd(vae, data, *, k: int = 100, batch_size: int = 32, n_batches: int | None = None,
                 n_bits: int | None = 8, device=None) -> dict:
    """Mean IWAE bits/dim of ``vae`` on ``data`` (Dataset or tensor of [0, 1] images)."""
    ds = D.as_dataset(data)
    was = vae.training
    vae.eval()
    total, count = 0.0, 0
    try:
        n = len(ds)
        nb = math.ceil(n / batch_size)
        if n_batches is not None:
            nb = min(nb, n_batches)
        rank, world = D.world()
        for b in range(rank, nb, world):  # ranks share the batches
            items = [ds[i] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
            x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
            if device is not None:
                x = x.to(device)
            # NVAE's densities are of the [-1, 1]-scaled image; bits/dim are for [0, 1] pixels
            lp = vae.iwae(x, k).double() + float(getattr(vae, "x_scale_log_det", 0.0))
            if not torch.isfinite(lp).all():
                raise ValueError(f"non-finite IWAE bound in evaluation batch {b}")
            total += float(bits_per_dim(lp, x[0].numel(), n_bits).sum())
            count += x.shape[0]
    finally:
        vae.train(was)
    dev = device if device is not None else "cpu"
    stats = D.all_reduce_mean(torch.tensor([total, float(count)], dtype=torch.float64,
                                           device=dev)) * world  # sums over ranks
    return {"bpd": float(stats[0] / stats[1]), "n": int(round(float(stats[1]))), "k": k,
            "n_bits": n_bits}


# --------------------------------------------------------------------------- trainer
def _plain_config(conf):
    """Model configs go into checkpoints as plain dicts: weights-only loading refuses dataclass
    instances, and a dict stays readable if the class changes."""
    return dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else conf


class VAETrainer(TrainLoop):
    """Stateful stage-1 trainer; :func:`train_vae` is the one-call form (the loop itself,
    resume and rollback are :class:`~.loop.TrainLoop`'s).

    ``data``: Dataset / tensor of (N, C, H, W) images in [0, 1] (or callable ``it -> batch``;
    then give ``cfg.steps``). ``eval_data``: evaluated in bits/dim every ``eval_every`` and at
    the end. ``callback(trainer, it, stats)`` returning True stops (after a checkpoint).
    """

    kind, ckpt_name = "vae", CKPT_NAME

    def __init__(self, vae, data, cfg: VAEConfig, *, eval_data=None, callback=None, device=None):
        self._init_loop(cfg, vae, callback=callback, device=device)
        self.eval_data = eval_data
        self.vae = vae.to(self.device)
        self._open_data(data)
        if self.stream is None and cfg.steps is None:
            raise ValueError("with a callable data source give cfg.steps (no epoch length)")
        per_epoch = self.stream.per_epoch if self.stream is not None else None
        self.total = int(cfg.steps if cfg.steps is not None else round(cfg.epochs * per_epoch))
        self.warmup = int(cfg.warmup_steps if cfg.warmup_steps is not None
                          else round(cfg.warmup_epochs * (per_epoch or 0)))
        self.params = [p for p in vae.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adamax(self.params, lr=cfg.lr, eps=cfg.adamax_eps,
                                            weight_decay=cfg.weight_decay)
        cuda = self.device.type == "cuda"
        self.amp = cfg.amp if cfg.amp is not None else cuda
        self.amp_dtype = getattr(torch, cfg.amp_dtype) if cfg.amp_dtype else (
            torch.float16 if cuda else torch.bfloat16)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and
                                           self.amp_dtype == torch.float16)
        self.alpha = group_alpha(vae, self.device)
        self.guard = DivergenceGuard(None, cfg.max_grad_norm, cfg.max_failures)
        self.lr_scale = 1.0
        self.history = {k: [] for k in ("iteration", "loss", "nelbo", "recon", "kl", "kl_coeff",
                                        "wdn", "spectral", "bn", "grad_norm", "lr", "seconds")}
        self.history.update(events=[], eval=[])
        self.data_shape = (tuple(vae.eps_shapes(1)[-1][1:]) if hasattr(vae, "eps_shapes")
                           else None)  # else fixed by the first batch

    def state_dict(self) -> dict:
        return {"format": "vaebm", "kind": "vae", "version": 1, "iteration": self.iteration,
                "config": to_dict(self.cfg), "vae": self.vae.state_dict(),
                "vae_config": _plain_config(getattr(self.vae, "config", None)),
                "vae_class": type(self.vae).__name__,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": capture_rng(), "world_size": self.world,
                "trainer": {"lr_scale": self.lr_scale, "failures": self.guard.failures,
                            "fail_it": self._fail_it},
                "history": self.history}

    def load_state_dict(self, ck: dict, *, restore_counters: bool = True) -> None:
        if ck.get("kind") != "vae":
            raise CheckpointError(f"not a VAE checkpoint (kind {ck.get('kind')!r})")
        self.vae.load_state_dict(ck["vae"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        restore_rng(ck["rng"])
        self.iteration = int(ck["iteration"])
        self.history = {k: list(v) for k, v in ck["history"].items()}
        if restore_counters:
            t = ck["trainer"]
            self.lr_scale = float(t["lr_scale"])
            self.guard.failures, self._fail_it = int(t["failures"]), int(t["fail_it"])

    def save(self, path=None):
        path = Path(path) if path else self.ckpt_path
        D.average_buffers(self.vae)  # BatchNorm statistics of all ranks, not rank 0's alone
        if path is not None and self.rank == 0:
            save_checkpoint(self._checkpoint_state(), path)
        D.barrier()
        return path

    def train_step(self, it: int, x: torch.Tensor):
        """One iteration; returns (stats, divergence reason or None). No state changes on
        divergence (and none when fp16's GradScaler skips an overflowing step)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.data_shape is None:
            xx = x[0] if isinstance(x, (tuple, list)) else x
            self.data_shape = tuple(xx.shape[1:])
        x = check_batch(x, self.data_shape, it, cfg.check_data_range)
        x = x.to(self.device, non_blocking=True)
        if x.shape[0] != self.local_batch:
            raise DataError(f"iteration {it}: batch of {x.shape[0]} rows, expected "
                            f"{self.local_batch}")
        beta = kl_coeff(it, self.total, cfg.kl_anneal_portion, cfg.kl_const_portion,
                        cfg.kl_min_coeff)
        lam = wdn_coeff(beta, cfg)
        lr = lr_at(it, cfg, self.total, self.warmup) * self.lr_scale
        self.vae.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            terms = self.vae.loss_terms(x)
            recon = -terms["log_p_x"].float()
            kl = torch.stack([k.float() for k in terms["kl"]], 1)  # (B, L)
            if self.alpha is not None and self.alpha.numel() != kl.shape[1]:
                raise ValueError(f"loss_terms gave {kl.shape[1]} KL groups but the model has "
                                 f"{self.alpha.numel()} latent groups (eps_shapes / kl_alpha)")
            if cfg.kl_balance and beta < 1.0:
                gamma = kl_balance_coeffs(kl, self.alpha)
            else:
                gamma = torch.ones(kl.shape[1], device=kl.device)
            loss = (recon + beta * (kl * gamma).sum(1)).mean()
            regs = self.vae.regularizers() if hasattr(self.vae, "regularizers") else {}
            zero = torch.zeros((), device=self.device)
            spec, bn = regs.get("spectral", zero), regs.get("bn", zero)
            loss = loss + lam * (spec.float() + bn.float())
        nelbo = (recon + kl.sum(1)).mean()
        self.scaler.scale(loss).backward()
        D.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        norms = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
        gnorm = torch.stack(norms).norm() if norms else torch.zeros((), device=self.device)
        vals = torch.stack([loss.detach().float(), nelbo.detach(), recon.detach().mean(),
                            kl.detach().sum(1).mean(), spec.detach().float(),
                            bn.detach().float(), gnorm.to(self.device),
                            gnorm.new_tensor(self._stop_pending).to(self.device)])
        vals = D.all_reduce_mean(vals).tolist()
        stats = dict(zip(("loss", "nelbo", "recon", "kl", "spectral", "bn", "grad_norm", "stop"),
                         vals))
        stats.update(kl_coeff=beta, wdn=lam, lr=lr)
        overflow = self.scaler.is_enabled() and not math.isfinite(stats["grad_norm"])
        reason = None if overflow else self.guard.check(stats["loss"], None, stats["grad_norm"])
        if reason is not None:
            return stats, reason
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip_norm)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.scaler.step(self.optimizer)  # skipped by the scaler on fp16 overflow
        self.scaler.update()
        stats["seconds"] = time.perf_counter() - t0
        return stats, None

    def evaluate(self) -> dict | None:
        if self.eval_data is None:
            return None
        res = evaluate_bpd(self.vae, self.eval_data, k=self.cfg.eval_iwae_k,
                           batch_size=self.local_batch, n_batches=self.cfg.eval_batches,
                           n_bits=self.cfg.n_bits, device=self.device)
        res["iteration"] = self.iteration
        self.history["eval"].append(res)
        if self.logger is not None:
            self.logger.event(self.iteration, f"eval: {res['bpd']:.4f} bits/dim "
                              f"(IWAE k={res['k']}, n={res['n']})")
        return res

    def sample_grid(self, path) -> None:
        """A grid of ``n_samples`` VAE samples (decoder means from N(0, I) eps), fixed seed."""
        if not hasattr(self.vae, "eps_shapes") or self.rank != 0:
            return
        from ..imageio import save_grid
        g = torch.Generator().manual_seed(self.cfg.seed)
        eps = [torch.randn(s, generator=g).to(self.device)
               for s in self.vae.eps_shapes(self.cfg.n_samples)]
        was = self.vae.training
        self.vae.eval()
        with torch.no_grad():
            x = self.vae.decode_eps(eps).x_mean.float().clamp(0, 1)
        self.vae.train(was)
        grid = save_grid(x, path)
        if self.logger is not None:
            self.logger.image("samples", grid, self.iteration)

    # ------------------------------------------------------------------ loop hooks
    def _fresh_start(self) -> None:
        D.broadcast_module(self.vae)  # every rank starts from rank 0's weights

    def _after_iteration(self, it: int) -> None:
        cfg = self.cfg
        if (cfg.eval_every and it % cfg.eval_every == 0) or it == self.total:
            self.evaluate()  # and always at the end, before the last checkpoint
        if cfg.sample_every and it % cfg.sample_every == 0 and self.out_dir is not None:
            self.sample_grid(self.out_dir / "samples" / f"vae_{it:07d}.png")


def load_vae_weights(vae, path, *, map_location="cpu", strict: bool = True):
    """Load the weights of a stage-1 checkpoint into ``vae`` (built by the caller, e.g. from
    the stored ``ck["vae_config"]``). Returns the checkpoint dict."""
    ck, _ = load_latest(path, kind="vae", map_location=map_location)
    vae.load_state_dict(ck["vae"], strict=strict)
    return ck


def train_vae(vae, data, cfg: VAEConfig | None = None, *, eval_data=None, resume="auto",
              callback=None, device=None, allow_config_change: bool = False,
              run_info: dict | None = None, **overrides) -> dict:
    """Train ``vae`` (the :class:`~vaebm.models.eps_space.StageOneVAE` contract) on ``data``;
    returns the history dict (per iteration: loss, nelbo, recon, kl, kl_coeff, wdn, spectral,
    bn, grad_norm, lr, seconds; ``eval``: bits/dim results; ``events``). On resume, a stored
    run with other lr / batch size / seed / model / ``run_info`` is refused unless
    ``allow_config_change`` (see :meth:`~.loop.TrainLoop.resume`)."""
    from .config import vae_config
    if cfg is None:
        cfg = vae_config(**overrides)
    elif overrides:
        from .config import validate
        cfg = dataclasses.replace(cfg, **overrides)
        validate(cfg)
    return VAETrainer(vae, data, cfg, eval_data=eval_data, callback=callback,
                      device=device).run(resume=resume, allow_config_change=allow_config_change,
                                         run_info=run_info)
