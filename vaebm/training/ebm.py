"""Stage 2 of VAEBM: train the energy net E(x) with the VAE frozen (paper Sec. 3.1, App. E).

One iteration (rank r of W, local batch B = batch_size / W)::

    eps  = N(0, I) starts for samples r*B .. r*B+B-1 (Philox, keyed by (seed, iteration, sample));
           eps_z replaced per sample by a replay-buffer state with probability p(it)
    eps  <- ld_steps Langevin steps in eps-space on E(T(eps)) (+ 0.5|eps|^2 or the official
           energy), VAE and E frozen (requires_grad False, E's weight cache in sampling mode)
    x-   = T_x(eps) ("sample") or mu_x(z) ("mean"), detached
    loss = E(x+).mean() - E(x-).mean() + alpha * sum of spectral norms of E's convs
           [+ energy_l2 * (mean E(x+)^2 + mean E(x-)^2), off in the paper's presets]
    grads averaged over ranks; per element clamped to +-(3 sqrt(v_hat) + 0.1) with Adam's
    bias-corrected second moment from the previous step (none on the first); Adam step
    (betas 0.99, 0.999; coupled L2 weight decay 3e-5; constant lr); eps_z pushed to the buffer.

Inside the chain E sees the x-sample T(eps) as in the published code, unless
``chain_negative="mean"`` (then mu_x(z), and ``vaebm sample`` does the same for such a run);
``negative`` picks what the loss's negative phase evaluates.

Divergence (non-finite loss, |E+ - E-| above ``max_energy_gap``, gradient norm above
``max_grad_norm``) is caught before the optimiser step: the trainer rolls back to its last
in-memory snapshot (taken at every multiple of ``snapshot_every`` iterations and carried by the
checkpoints, so a resumed run rolls back where the uninterrupted one does; checkpoints on disk
are never written from a bad state), halves the lr (or changes the chains' seed) and goes on;
after ``max_failures`` failures in a row it raises :class:`TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from ..models.eps_space import eps_energy_fn
from ..sampling.buffer import ReplayBuffer
from ..sampling.generate import frozen_params, initial_eps
from ..sampling.langevin import FusedLangevin
from . import distributed as D
from .checkpoint import (CheckpointError, DivergenceGuard, TrainingDiverged, capture_rng,
                         load_latest, restore_rng, save_checkpoint)
from .config import EBMConfig, to_dict
from .loop import TrainLoop

__all__ = ["EBMTrainer", "train_ebm", "clip_grad_adam_", "DataError", "TrainingDiverged",
           "check_batch", "load_energy"]

CKPT_NAME = "ebm.pt"


class DataError(ValueError):
    """A training batch is unusable (NaN/Inf pixels, wrong shape or range)."""


def check_batch(x, shape, it, check_range: bool = True) -> torch.Tensor:
    """Validate one batch (B, *shape) of images in [0, 1]; returns it as a float tensor.
    ``it``: the iteration (int) or a label such as "data-init batch 0" for the messages."""
    it = it if isinstance(it, str) else f"iteration {it}"
    if isinstance(x, (tuple, list)):
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{it}: a batch must be a tensor, got {type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(shape) or x.ndim != len(shape) + 1:
        raise DataError(f"{it}: batch of shape {tuple(x.shape)}, expected "
                        f"(B, {', '.join(map(str, shape))}) to match the VAE's data shape")
    if not x.is_floating_point():
        raise DataError(f"{it}: batch has dtype {x.dtype}; expected floats in [0, 1] "
                        "(convert uint8 images with x.float() / 255)")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise DataError(f"{it}: batch has {int(bad.sum())} NaN/Inf values in "
                        f"rows {rows[:10]}{' ...' if len(rows) > 10 else ''}")
    if check_range:
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise DataError(f"{it}: pixel values span [{lo:.3g}, {hi:.3g}], expected "
                            "[0, 1] (set check_range/check_data_range=False to allow)")
    return x


@torch.no_grad()
def clip_grad_adam_(optimizer: torch.optim.Optimizer, n_std: float = 3.0,
                    offset: float = 0.1) -> None:
    """Clamp every gradient element to +-(n_std * sqrt(v_hat) + offset) in place, v_hat =
    exp_avg_sq / (1 - beta2^step) being Adam's bias-corrected second moment after the previous
    step (Du & Mordatch 2019, as the VAEBM code). Parameters without Adam state yet (the first
    step) are left alone. No host synchronisation."""
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            st = optimizer.state.get(p)
            if p.grad is None or not st or "exp_avg_sq" not in st:
                continue
            step = st["step"]
            if not torch.is_tensor(step) or step.device.type == "cpu":
                step = float(step)  # Adam keeps it on the CPU unless capturable/fused: no sync
            else:
                step = step.to(torch.float64)
            bound = (st["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().mul_(n_std).add_(offset)
            bound = bound.to(p.grad.dtype)
            torch.maximum(torch.minimum(p.grad, bound), -bound, out=p.grad)


def _fingerprint(module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum() + p.numel() for p in module.parameters()))


def _grad_norm(params) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


class EBMTrainer(TrainLoop):
    """Stateful stage-2 trainer; :func:`train_ebm` is the one-call form (the loop itself,
    resume and rollback are :class:`~.loop.TrainLoop`'s).

    Args:
      vae: a VAE with the eps-space contract (:class:`vaebm.models.eps_space.EpsVAE`).
      energy: E(x), (B, *data_shape) -> (B,); an :class:`~vaebm.models.EnergyNet` gets its
        data-dependent init, spectral regulariser and frozen sampling mode.
      data: a Dataset / (N, *data_shape) tensor (batched by :class:`~.distributed.BatchStream`,
        resumable exactly), or a callable ``data(it) -> this rank's batch``.
      cfg: :class:`~.config.EBMConfig`.
      callback: ``callback(trainer, it, stats)`` after every completed iteration; returning
        True stops training (a checkpoint is written).
    """

    kind, ckpt_name = "ebm", CKPT_NAME

    def __init__(self, vae, energy, data, cfg: EBMConfig, *, callback=None, device=None):
        self._init_loop(cfg, energy, callback=callback, device=device)
        self.vae, self.energy = vae.to(self.device), energy.to(self.device)
        self.vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.data_shape = tuple(vae.eps_shapes(1)[-1][1:])
        self.z_shapes = [tuple(s[1:]) for s in vae.eps_shapes(1)[:-1]]
        self._open_data(data)
        self.params = [p for p in energy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=tuple(cfg.betas),
                                          weight_decay=cfg.weight_decay)
        self.buffer = None
        if cfg.buffer_size > 0:
            cap = max(1, cfg.buffer_size // self.world)
            self.buffer = ReplayBuffer(self.z_shapes, cap, prob=cfg.buffer_prob,
                                       ramp=cfg.buffer_ramp, seed=cfg.seed + self.rank,
                                       device=self.device,
                                       dtype=getattr(torch, cfg.buffer_dtype))
        self.guard = DivergenceGuard(cfg.max_energy_gap, cfg.max_grad_norm, cfg.max_failures)
        self.lr_scale, self.seed_offset = 1.0, 0
        self.history = {k: [] for k in ("iteration", "loss", "e_pos", "e_neg", "spectral",
                                        "grad_norm", "lr", "buffer_p", "replayed", "seconds")}
        self.history["events"] = []
        self.vae_fingerprint = _fingerprint(vae)

    @property
    def total(self) -> int:
        return self.cfg.steps

    # ------------------------------------------------------------------ state
    def state_dict(self, *, with_buffer: bool = True) -> dict:
        """Everything to resume exactly at ``self.iteration`` (the next iteration to run).
        ``with_buffer=False`` leaves the replay buffer out (in-memory rollback points: copying
        gigabytes of stored chains every ``snapshot_every`` iterations is not worth it)."""
        return {"format": "vaebm", "kind": "ebm", "version": 1, "iteration": self.iteration,
                "config": to_dict(self.cfg), "energy": self.energy.state_dict(),
                "energy_config": getattr(self.energy, "config", None),
                "optimizer": self.optimizer.state_dict(),
                "buffer": (self.buffer.state_dict() if self.buffer is not None and with_buffer
                           else None),
                "rng": capture_rng(), "world_size": self.world,
                "trainer": {"lr_scale": self.lr_scale, "seed_offset": self.seed_offset,
                            "failures": self.guard.failures, "fail_it": self._fail_it,
                            "next_chain_seed": self.chain_seed(self.iteration)},
                "history": self.history, "vae_fingerprint": self.vae_fingerprint}

    def load_state_dict(self, ck: dict, *, restore_counters: bool = True) -> None:
        if ck.get("kind") != "ebm":
            raise CheckpointError(f"not an EBM checkpoint (kind {ck.get('kind')!r})")
        fp = ck.get("vae_fingerprint")
        if fp is not None and abs(fp - self.vae_fingerprint) > 1e-6 * max(1.0, abs(fp)):
            raise ValueError("the checkpoint was trained on a different VAE (parameter "
                             "fingerprint differs); load the same stage-1 VAE to resume")
        self.energy.load_state_dict(ck["energy"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.buffer is not None and ck.get("buffer") is not None:
            if int(ck.get("world_size", 1)) == self.world:
                self.buffer.load_state_dict(ck["buffer"])
            else:  # capacity is per rank: a different world size starts the buffers empty
                self._event(f"replay buffer not restored: saved with {ck.get('world_size')} "
                            f"ranks, running with {self.world}")
        restore_rng(ck["rng"])
        self.iteration = int(ck["iteration"])
        self.history = {k: list(v) for k, v in ck["history"].items()}
        if restore_counters:
            t = ck["trainer"]
            self.lr_scale, self.seed_offset = float(t["lr_scale"]), int(t["seed_offset"])
            self.guard.failures, self._fail_it = int(t["failures"]), int(t["fail_it"])

    def save(self, path=None) -> Path | None:
        """Checkpoint on rank 0 (other ranks add their replay buffer beside it); all ranks wait."""
        path = Path(path) if path else self.ckpt_path
        if path is None:
            return None
        if self.rank == 0:
            save_checkpoint(self._checkpoint_state(), path)
        elif self.buffer is not None:
            save_checkpoint({"kind": "ebm-buffer", "rank": self.rank,
                             "iteration": self.iteration, "buffer": self.buffer.state_dict()},
                            path.with_name(f"{path.stem}.buffer-rank{self.rank}.pt"))
        D.barrier()
        return path

    def _resume_extra(self, path) -> None:
        # ranks > 0 take their own replay buffer, saved beside the checkpoint by save()
        if self.rank > 0 and self.buffer is not None:
            bp = Path(path).with_name(f"{Path(path).stem}.buffer-rank{self.rank}.pt")
            if bp.exists():
                b = load_latest(bp)[0]
                if int(b["iteration"]) == self.iteration:
                    self.buffer.load_state_dict(b["buffer"])

    # ------------------------------------------------------------------ pieces
    def chain_seed(self, it: int) -> int:
        """Philox seed of iteration ``it``'s starts and chain noise (same on every rank)."""
        return (self.cfg.seed * 0x9E3779B1 + self.seed_offset * 0x85EBCA77 + it) % (2**62)

    def data_init(self) -> int:
        """Data-dependent init of E from ``data_init_batches`` real batches (stats averaged
        over ranks); skipped when E was initialised already (e.g. loaded)."""
        if not hasattr(self.energy, "data_init") or self.cfg.data_init_batches == 0:
            return 0
        if getattr(self.energy, "initialised", False):
            return 0
        D.broadcast_module(self.energy)  # the random init must agree before the statistics
        if self.stream is not None:
            batches = self.stream.first_batches(self.cfg.data_init_batches)
        else:
            batches = [self.data_fn(-1 - i) for i in range(self.cfg.data_init_batches)]
        batches = [check_batch(b, self.data_shape, f"data-init batch {i}",
                               self.cfg.check_data_range).to(self.device)
                   for i, b in enumerate(batches)]
        n = self.energy.data_init(batches)
        self._event(f"data-dependent init of {n} layers from {len(batches)} batches")
        return n

    def negatives(self, it: int):
        """Run the chains of iteration ``it``: returns (x_neg (B, *data), eps list, replay mask)."""
        cfg, B = self.cfg, self.local_batch
        seed, start = self.chain_seed(it), self.rank * B
        eps = initial_eps(self.vae, start, B, seed, device=self.device)
        replay = torch.zeros(B, dtype=torch.bool)
        if self.buffer is not None:
            z, replay = self.buffer.sample(eps[:-1], it)
            eps = z + [eps[-1]]
        fn, lam = eps_energy_fn(self.vae, self.energy, cfg.energy_mode,
                                negative=cfg.chain_negative or "sample")
        was_training = self.energy.training
        self.energy.eval()
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(frozen_params(self.vae, self.energy))
                for m in (self.energy, self.vae):  # sampling mode: weights cached, detached
                    if hasattr(m, "frozen"):
                        stack.enter_context(m.frozen())
                sampler = FusedLangevin(eps, cfg.ld_step_size, lam=lam, seed=seed,
                                        sample_offset=start, backend=cfg.ld_backend, track=False)
                for _ in range(cfg.ld_steps):
                    sampler.step(fn)
        finally:
            self.energy.train(was_training)
        with torch.no_grad():
            out = self.vae.decode_eps(eps)
            x_neg = out.x_mean if cfg.negative == "mean" else out.x_sample
        return x_neg.detach(), eps, replay

    def _batch(self, it, x):
        return check_batch(x, self.data_shape, it, self.cfg.check_data_range).to(
            self.device, non_blocking=True)

    def train_step(self, it: int, x: torch.Tensor):
        """One iteration on this rank's batch ``x``. Returns (stats dict, divergence reason or
        None); on divergence no parameter, optimiser or buffer state has changed."""
        cfg = self.cfg
        t0 = time.perf_counter()
        x = self._batch(it, x)
        if x.shape[0] != self.local_batch:
            raise DataError(f"iteration {it}: batch of {x.shape[0]} rows, expected "
                            f"{self.local_batch} (global batch {cfg.batch_size} over "
                            f"{self.world} ranks)")
        x_neg, eps, replay = self.negatives(it)
        self.optimizer.zero_grad(set_to_none=True)
        e_pos = self.energy(x)
        e_neg = self.energy(x_neg)
        if hasattr(self.energy, "spectral_regularisation"):
            spec = self.energy.spectral_regularisation()
        else:
            spec = torch.zeros((), device=self.device)
        cd = e_pos.mean() - e_neg.mean()
        loss = cd + cfg.alpha_spectral * spec
        if cfg.energy_l2:
            # keeps both energies near 0 (IGEBM): without it nothing in the loss fixes the
            # energy's offset, and on a weak VAE E(x+) and E(x-) drift to -1e3 .. -5e3 together
            loss = loss + cfg.energy_l2 * (e_pos.float().square().mean()
                                           + e_neg.float().square().mean())
        loss.backward()
        D.average_gradients(self.params)
        gnorm = _grad_norm(self.params)
        vals = torch.stack([loss.detach().float(), e_pos.detach().float().mean(),
                            e_neg.detach().float().mean(), spec.detach().float(),
                            gnorm.to(loss.device), loss.new_tensor(self._stop_pending).float()])
        vals = D.all_reduce_mean(vals).tolist()  # the one host sync of the iteration
        loss_v, ep, en, sp, gn, stop = vals
        reason = self.guard.check(loss_v, ep - en, gn)
        lr = cfg.lr * self.lr_scale
        stats = {"loss": loss_v, "e_pos": ep, "e_neg": en, "spectral": sp, "grad_norm": gn,
                 "stop": stop,
                 "lr": lr, "buffer_p": self.buffer.probability(it) if self.buffer else 0.0,
                 "replayed": float(replay.float().mean())}
        if reason is not None:
            return stats, reason
        if cfg.grad_clip:
            clip_grad_adam_(self.optimizer, cfg.clip_std, cfg.clip_offset)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        if self.buffer is not None:
            self.buffer.push(eps[:-1])
        stats["seconds"] = time.perf_counter() - t0
        self._x_neg = x_neg
        return stats, None

    def _snapshot_state(self) -> dict:
        # without the buffer: a rollback keeps the chains pushed since, which all came from
        # iterations that passed the divergence checks
        return self.state_dict(with_buffer=False)

    def _remedy(self) -> str:
        cfg = self.cfg
        if cfg.on_divergence == "lr":
            self.lr_scale *= cfg.divergence_lr_factor
            return f"lr x{cfg.divergence_lr_factor} -> {cfg.lr * self.lr_scale:.3g}"
        self.seed_offset += 1
        return f"new chain seed offset {self.seed_offset}"

    def _grid(self, it):
        if self.out_dir is None or self.rank != 0:
            return
        from ..imageio import save_grid
        x = self._x_neg[:64].clamp(0, 1)
        grid = save_grid(x, self.out_dir / "samples" / f"ebm_{it + 1:07d}.png")
        if self.logger is not None:
            self.logger.image("negatives", grid, it)

    # ------------------------------------------------------------------ loop hooks
    def _fresh_start(self) -> None:
        D.broadcast_module(self.energy)  # every rank starts from rank 0's weights
        self.data_init()

    def _after_iteration(self, it: int) -> None:
        if self.cfg.sample_every and it % self.cfg.sample_every == 0:
            self._grid(it - 1)

    def _on_stop(self, it: int) -> None:
        self._event(f"stopped by the callback after iteration {it}")


def load_energy(path, *, map_location="cpu"):
    """Rebuild the :class:`~vaebm.models.EnergyNet` of a stage-2 checkpoint (its stored
    ``energy_config``) with the trained weights, in eval mode. Returns (net, checkpoint).
    The stored config and tensors are checked before anything is allocated
    (:func:`vaebm.loading.load_ebm`, which this is)."""
    from ..loading import load_ebm
    return load_ebm(path, map_location=map_location)


def train_ebm(vae, energy, data, cfg: EBMConfig | None = None, *, resume="auto", callback=None,
              device=None, **overrides) -> dict:
    """Train ``energy`` on ``data`` against the frozen ``vae``; returns the history dict
    (lists per iteration: loss, e_pos, e_neg, spectral, grad_norm, lr, buffer_p, replayed,
    seconds; and ``events``). ``overrides`` replace fields of ``cfg`` (default EBMConfig())."""
    from .config import ebm_config
    if cfg is None:
        cfg = ebm_config(**overrides)
    elif overrides:
        import dataclasses

        from .config import validate
        cfg = dataclasses.replace(cfg, **overrides)
        validate(cfg)
    trainer = EBMTrainer(vae, energy, data, cfg, callback=callback, device=device)
    return trainer.run(resume=resume)
