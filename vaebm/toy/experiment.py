"""The 2-D likelihood experiment of Sec. 5.4: ``vaebm demo`` / :func:`run_demo`.

1. Stage 1: an MLP VAE trained by the ELBO on fresh 25-Gaussians samples.
2. Stage 2: the VAE frozen, an MLP energy trained by E(x_data).mean() - E(x_neg).mean() (Eq. 7)
   with negatives from persistent chains in eps-space on E(T(eps)) + |eps|^2/2 (Eq. 9, through
   :func:`vaebm.models.eps_space.eps_energy_fn`): MALA steps by :func:`vaebm.langevin_sample`
   plus independence Metropolis-Hastings moves from the prior that carry chains between modes
   (see :func:`train_energy` for why each piece is needed).
3. log Z = log int p_vae(x) exp(-E(x)) dx on a grid: for M prior draws z_m the decoder Gaussian's
   mass in every grid cell is exact (products of normal CDF differences, summed over m by one
   matrix product), so sum_cells mass(cell) * exp(-E(centre)) is an unbiased Monte Carlo estimate
   of the grid-cell integral with no IWAE bias; mass outside the grid is added from decoder samples
   that land there. Cross-check: the plain Monte Carlo E_{x ~ p_vae}[exp(-E(x))] on the same draws.
4. Test log-likelihoods: VAE by IWAE(K); VAEBM = IWAE(K) - E(x) - log Z (a lower bound, as
   IWAE is); truth exactly. The evaluated energy is the EMA of the energy's weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch

from .._progress import Progress, interval
from ..models.eps_space import eps_energy_fn
from ..sampling import langevin_sample
from ..sampling.generate import frozen_params
from .data import get_dataset
from .models import ToyEnergy, ToyVAE

PAPER = {"vae": -2.97, "vaebm": -1.50, "true": -1.10}
PROGRESS_INTERVAL = 5.0  # seconds between the demo's progress lines ($VAEBM_PROGRESS_INTERVAL)


@dataclasses.dataclass
class DemoConfig:
    seed: int = 0
    dataset: str = "25gaussians"
    latent_dim: int = 20
    hidden: int = 256
    layers: int = 4
    # stage 1 (VAE): Adam, cosine-decayed lr, KL weight warmed up over the first 30%
    vae_steps: int = 3000
    vae_batch: int = 512
    vae_lr: float = 1e-3
    # stage 2 (energy): persistent chains (all ebm_batch of them advanced every step) in
    # eps-space; each step: prior_mh independence MH moves, then ld_steps MALA steps whose
    # step size is adapted between training steps toward target_accept
    ebm_steps: int = 2000
    ebm_batch: int = 512
    ebm_lr: float = 1e-3  # cosine-decayed to ebm_lr / 20
    ebm_beta1: float = 0.9
    ebm_ema: float = 0.99  # the evaluated energy is this exponential moving average of weights
    energy_input_scale: float = 8.0
    energy_l2: float = 0.01  # alpha * (E_pos^2 + E_neg^2): pins E's free additive constant
    ld_steps: int = 10
    ld_step_size: float = 0.05  # initial MALA step size; adapted during training
    mala: bool = True
    target_accept: float = 0.6
    prior_mh: int = 1  # independence Metropolis-Hastings moves (proposal N(0, I)) per step
    # evaluation
    n_test: int = 10000
    iwae_k: int = 1000
    grid_n: int = 512
    z_samples: int = 2**18
    n_plot: int = 3000
    sample_steps: int = 200
    backend: str | None = None  # Langevin backend (None: the library's default order)

    @classmethod
    def paper(cls, **kw):
        """The paper's evaluation protocol: 100,000 test points, IWAE with 10,000 samples."""
        return cls(**{"n_test": 100_000, "iwae_k": 10_000, "z_samples": 2**20, "grid_n": 1024,
                      **kw})


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def _stage(log, total: int, desc: str, unit: str = "steps") -> Progress:
    """Time-based progress lines of one demo stage through ``log`` (and a closing line)."""
    return Progress(total, desc, unit, write=log, prefix="  ", final=True,
                    interval_s=interval(PROGRESS_INTERVAL))


def train_vae(vae: ToyVAE, data, cfg: DemoConfig, log=print) -> list[float]:
    """Stage 1; a progress line through ``log`` every few seconds."""
    gen = _gen(cfg.seed, 1)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps, eta_min=cfg.vae_lr / 20)
    warm = max(1, int(0.3 * cfg.vae_steps))
    losses = []
    vae.train()
    with _stage(log, cfg.vae_steps, "stage 1/4 VAE") as bar:
        for it in range(cfg.vae_steps):
            x = data.sample(cfg.vae_batch, gen)
            loss = -vae.elbo(x, kl_weight=min(1.0, (it + 1) / warm)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.moveto(it + 1, **{"-elbo": f"{sum(losses[-100:]) / len(losses[-100:]):.3f}"})
    vae.eval()
    return losses


def eps_langevin(vae: ToyVAE, energy, state, steps: int, step_size: float, *, seed: int,
                 mala: bool, backend=None):
    """``steps`` Langevin (MALA if ``mala``) steps in eps-space on E(T(eps)) + |eps|^2/2 (Eq. 9)
    with the energy's weights frozen. state: [eps_z (B, latent), eps_x (B, 2)].
    Returns (new state, acceptance rate)."""
    fn, lam = eps_energy_fn(vae, energy, "paper")
    with frozen_params(vae, energy):
        out, stats = langevin_sample(fn, state, steps, step_size, lam=lam, seed=seed, mala=mala,
                                     backend=backend, return_stats=True)
    return out, float(stats.acceptance_rate) if steps else 1.0


@torch.no_grad()
def prior_mh(vae: ToyVAE, energy, state, *, generator: torch.Generator | None = None):
    """One independence Metropolis-Hastings move per chain with proposal eps' ~ N(0, I) (a fresh
    VAE sample) on the eps-space target exp(-E(T(eps)) - |eps|^2 / 2): the Gaussian factors
    cancel, so the move is accepted with probability min(1, exp(E(T(eps)) - E(T(eps')))).
    It leaves the target invariant, and it lets chains jump between the 25 modes, which local
    Langevin moves across the energy walls between them essentially never do.
    state: [eps_z (B, latent), eps_x (B, 2)], not modified. Returns (new state, acceptance rate)."""
    fn, _ = eps_energy_fn(vae, energy, "paper")  # E(T(eps)); the sampler's lam = 1 base
    prop = [torch.randn(s.shape, generator=generator, dtype=s.dtype) for s in state]
    log_ratio = fn(state) - fn(prop)
    ok = torch.rand(log_ratio.shape, generator=generator) < log_ratio.exp()
    out = [torch.where(ok.view(-1, *[1] * (s.dim() - 1)), q, s) for s, q in zip(state, prop)]
    return out, float(ok.double().mean())


def train_energy(vae: ToyVAE, energy: ToyEnergy, data, cfg: DemoConfig, log=print) -> dict:
    """Stage 2 with the VAE frozen: loss E(x_data).mean() - E(x_neg).mean() + alpha (E_pos^2 +
    E_neg^2) (Eq. 7 plus a small magnitude penalty). The penalty shifts the loss's fixed point
    to p_model / p_data = (1 + 2 alpha E) / (1 - 2 alpha E), so alpha is kept small (0.01
    scored ~0.015 nats better than 0.05 on two seeds).

    Why these choices. The VAE leaves its 25 modes ~3x too wide (70% of its mass lies beyond 3
    component stds), so the energy must carve 25 wells as narrow as a component (std 0.084) with
    walls between them; through the decoder's Jacobian (|d mu / d z| up to ~2) such wells are
    stiff in eps-space. Measured failure modes and their fixes:
      - unadjusted Langevin with a fixed step is unstable inside the wells: chains get thrown
        out, the data side of the loss keeps digging where no negative lands, log Z explodes.
        Fix: MALA, its step size adapted between training steps toward ``target_accept``;
      - negatives lagging behind the model (a large buffer visited rarely): fix: persistent
        chains, all advanced every step (PCD);
      - once walls stand between the modes, local moves no longer carry chains from mode to
        mode, so the chains' share of each mode freezes; the loss then deepens whichever mode is
        under-visited without limit (one mode ended with 7x its mass, costing ~1 nat). Fix:
        ``prior_mh`` independence MH moves from N(0, I) per step (:func:`prior_mh`), which
        rebalance the chains across modes exactly;
      - Adam with cosine-decayed lr and an EMA of the weights (the evaluated energy) remove the
        last steps' noise from the estimated density.
    Returns the history and the EMA energy (a copy; ``energy`` keeps the last iterate)."""
    gen = _gen(cfg.seed, 2)
    vae.requires_grad_(False)
    opt = torch.optim.Adam(energy.parameters(), lr=cfg.ebm_lr, betas=(cfg.ebm_beta1, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.ebm_steps),
                                                       eta_min=cfg.ebm_lr / 20)
    ema = copy.deepcopy(energy).requires_grad_(False)
    state = [torch.randn(s, generator=gen) for s in vae.eps_shapes(cfg.ebm_batch)]
    eta = cfg.ld_step_size
    hist = {"loss": [], "e_pos": [], "e_neg": [], "accept": [], "step_size": [], "mh_accept": []}
    bar = _stage(log, cfg.ebm_steps, "stage 2/4 energy")
    for it in range(cfg.ebm_steps):
        for _ in range(cfg.prior_mh):
            state, mh_acc = prior_mh(vae, energy, state, generator=gen)
            hist["mh_accept"].append(mh_acc)
        state, acc = eps_langevin(vae, energy, state, cfg.ld_steps, eta, mala=cfg.mala,
                                  seed=cfg.seed * 1_000_003 + it, backend=cfg.backend)
        hist["accept"].append(acc)
        hist["step_size"].append(eta)
        if cfg.mala:  # adapt between (not within) chain segments: each segment is exact MALA
            eta *= 1.03 if acc > cfg.target_accept else 1 / 1.03
        with torch.no_grad():
            x_neg = vae.decode_eps(state).x_sample
        x_pos = data.sample(cfg.ebm_batch, gen)
        e_pos, e_neg = energy(x_pos), energy(x_neg)
        loss = e_pos.mean() - e_neg.mean() + cfg.energy_l2 * (e_pos**2 + e_neg**2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"energy training diverged at step {it} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), energy.parameters()):
                pe.lerp_(p, 1 - cfg.ebm_ema)
        for k, v in (("loss", loss), ("e_pos", e_pos.mean()), ("e_neg", e_neg.mean())):
            hist[k].append(v.item())
        m = lambda k: sum(hist[k][-50:]) / len(hist[k][-50:])  # noqa: E731
        info = {"E(data)": f"{m('e_pos'):+.3f}", "E(neg)": f"{m('e_neg'):+.3f}",
                "MALA accept": f"{m('accept'):.2f} (step {eta:.3g})"}
        if hist["mh_accept"]:
            info["prior-MH accept"] = f"{m('mh_accept'):.2f}"
        bar.moveto(it + 1, **info)
    bar.close()
    hist["ema"] = ema
    hist["final_step_size"] = eta
    return hist


def normal_cell_mass(mu: torch.Tensor, sigma: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Mass of N(mu_m, sigma_m^2) in each cell [edges_i, edges_{i+1}): (M,), (M,), (n+1,) -> (M, n)."""
    cdf = torch.special.ndtr((edges[None, :] - mu[:, None]) / sigma[:, None])
    return (cdf[:, 1:] - cdf[:, :-1]).clamp_min(0)


def grid_centres(lim: float, n: int):
    edges = torch.linspace(-lim, lim, n + 1, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    pts = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    return edges, centres, pts


@torch.no_grad()
def log_partition(vae: ToyVAE, energy, *, lim: float, grid_n: int = 512, n_samples: int = 2**18,
                  chunk: int = 8192, generator: torch.Generator | None = None,
                  x_check: torch.Tensor | None = None, on_chunk=None) -> dict:
    """log Z = log int p_vae(x) exp(-E(x)) dx for a VAE with N(0, I) prior and diagonal Gaussian
    decoder over 2-D x; ``energy`` maps (N, 2) -> (N,). Returns the grid estimate ``log_z``, the
    plain Monte Carlo ``log_z_mc`` on the same prior draws, and the VAE mass inside the grid.
    With ``x_check`` (N, 2) also ``vae_ll_grid``: the mean over x_check of log(cell mass / cell
    area), the VAE's log density from the same prior draws (no IWAE), a cross-check of IWAE.
    ``on_chunk(done, n_samples)`` is called after each chunk of prior draws (progress)."""
    edges, _, pts = grid_centres(lim, grid_n)
    e_grid = torch.cat([energy(p.float()).double() for p in pts.split(65536)]).view(grid_n, grid_n)
    mass = torch.zeros(grid_n, grid_n, dtype=torch.float64)
    mc, tail = [], []
    for i in range(0, n_samples, chunk):
        m = min(chunk, n_samples - i)
        mu, ls = vae.decode(torch.randn(m, vae.latent_dim, generator=generator))
        mu, sd = mu.double(), ls.double().exp()
        mass += normal_cell_mass(mu[:, 0], sd[:, 0], edges).T @ normal_cell_mass(mu[:, 1], sd[:, 1], edges)
        x = (mu + sd * torch.randn(m, 2, generator=generator, dtype=torch.float64)).float()
        neg_e = -energy(x).double()
        mc.append(neg_e)
        tail.append(torch.where((x.abs() > lim).any(1), neg_e, -math.inf))
        if on_chunk is not None:
            on_chunk(i + m, n_samples)
    mass /= n_samples
    log_m = math.log(n_samples)
    lse_grid = torch.logsumexp((mass.log() - e_grid).flatten(), 0)
    lse_tail = torch.logsumexp(torch.cat(tail), 0) - log_m
    out = {"log_z": float(torch.logaddexp(lse_grid, lse_tail)),
           "log_z_mc": float(torch.logsumexp(torch.cat(mc), 0) - log_m),
           "vae_mass_in_grid": float(mass.sum()), "grid_lim": lim, "grid_n": grid_n,
           "n_samples": n_samples}
    if x_check is not None:
        h = 2 * lim / grid_n
        idx = ((x_check.double() + lim) / h).floor().long()
        inside = ((idx >= 0) & (idx < grid_n)).all(1)
        idx = idx[inside]
        out["vae_ll_grid"] = float((mass[idx[:, 0], idx[:, 1]] / h**2).log().mean())
        out["x_check_inside"] = float(inside.double().mean())
    return out


@torch.no_grad()
def heldout_log_likelihoods(vae: ToyVAE, energy, x: torch.Tensor, *, iwae_k: int, log_z: float,
                         generator: torch.Generator | None = None, on_chunk=None) -> dict:
    """Per-point test log-likelihoods (B,) float64 for x (B, 2): ``vae`` = IWAE(K) bound on
    log p_vae(x); ``vaebm`` = IWAE(K) - E(x) - log Z, log p of h(x) = p_vae(x) e^{-E(x)} / Z.
    The IWAE bound is used in both places, so VAEBM's figure is a lower bound too (log Z is
    estimated without IWAE, from prior draws: see :func:`log_partition`).
    ``on_chunk(done, len(x))`` is called after each chunk of points (progress); the chunks are
    whole passes of :meth:`ToyVAE.iwae`, so the random draws are those of one call."""
    rows = 32768  # ToyVAE.iwae's max_rows (decoder rows per pass)
    per = max(1, rows // min(iwae_k, rows))
    step = per * max(1, 4096 // per)
    parts = []
    for i in range(0, x.shape[0], step):
        parts.append(vae.iwae(x[i:i + step], iwae_k, max_rows=rows, generator=generator))
        if on_chunk is not None:
            on_chunk(min(i + step, x.shape[0]), x.shape[0])
    iw = torch.cat(parts).double()
    e = torch.cat([energy(c) for c in x.split(65536)]).double()
    return {"vae": iw, "vaebm": iw - e - log_z, "energy": e}


def sample_vaebm(vae: ToyVAE, energy, n: int, steps: int, step_size: float, *, seed: int,
                 mala: bool = True, mh_every: int = 10, backend=None,
                 on_step=None) -> torch.Tensor:
    """VAEBM samples (n, 2): eps-space chains from eps ~ N(0, I) (VAE samples): ``steps``
    Langevin steps (MALA by default), with one prior independence-MH move (:func:`prior_mh`)
    before every ``mh_every`` of them (0: none); then x = T(eps) (Eq. 8). ``on_step(done,
    steps)`` is called after each segment (progress)."""
    g = _gen(seed, 3)
    state = [torch.randn(s, generator=g) for s in vae.eps_shapes(n)]
    done = 0
    while done < steps:
        k = min(mh_every, steps - done) if mh_every else steps
        if mh_every:
            state, _ = prior_mh(vae, energy, state, generator=g)
        state, _ = eps_langevin(vae, energy, state, k, step_size, mala=mala,
                                seed=seed * 1_000_003 + 999_983 + done, backend=backend)
        done += k
        if on_step is not None:
            on_step(done, steps)
    with torch.no_grad():
        return vae.decode_eps(state).x_sample


def mode_fraction(data, x: torch.Tensor, n_std: float = 3.0) -> float:
    """Fraction of samples within n_std component stds of some component mean."""
    d = torch.cdist(x.double(), data.means).min(1)
    return float((d.values <= n_std * data.std[d.indices]).double().mean())


_POINT_RGB = np.array([31, 119, 180], dtype=np.float64)  # matplotlib's first colour


def render_panels(sets: dict, lim: float, *, size: int = 480, pad: int = 16,
                  alpha: float = 0.5) -> np.ndarray:
    """Fig. 4 without matplotlib: one square panel per sample set (points (N, 2) drawn on
    [-lim, lim]^2, y up), side by side, each framed by a grey border, on white. A point is a
    small plus-shaped splat; overlapping points darken like matplotlib's ``alpha`` does.
    Returns an (H, W, 3) uint8 image (numpy only)."""
    k = len(sets)
    h, w = size + 2 * pad, k * size + (k + 1) * pad
    img = np.full((h, w, 3), 255.0)
    for j, x in enumerate(sets.values()):
        x = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float64)
        x = x.reshape(-1, 2)
        x = x[np.isfinite(x).all(1)]
        col = np.floor((x[:, 0] + lim) / (2 * lim) * size).astype(np.int64)
        row = np.floor((lim - x[:, 1]) / (2 * lim) * size).astype(np.int64)
        ok = (col >= 0) & (col < size) & (row >= 0) & (row < size)
        counts = np.bincount(row[ok] * size + col[ok], minlength=size * size)
        counts = counts.reshape(size, size).astype(np.float64)
        splat = counts.copy()  # the pixel and its four neighbours
        splat[1:] += counts[:-1]
        splat[:-1] += counts[1:]
        splat[:, 1:] += counts[:, :-1]
        splat[:, :-1] += counts[:, 1:]
        a = 1.0 - (1.0 - alpha) ** splat
        y0, x0 = pad, pad + j * (size + pad)
        img[y0:y0 + size, x0:x0 + size] = (255.0 * (1 - a[..., None])
                                           + _POINT_RGB * a[..., None])
        grey = 90.0  # the frame, just outside the plotting area
        img[y0 - 1, x0 - 1:x0 + size + 1] = grey
        img[y0 + size, x0 - 1:x0 + size + 1] = grey
        img[y0 - 1:y0 + size + 1, x0 - 1] = grey
        img[y0 - 1:y0 + size + 1, x0 + size] = grey
    return np.round(img).astype(np.uint8)


def _png_with_title(img: np.ndarray, title: str) -> bytes:
    """PNG bytes of ``img`` with a tEXt ``Title`` chunk (image viewers show it)."""
    import struct
    import zlib

    from ..imageio import png_bytes

    png = png_bytes(img)
    body = b"Title\0" + title.encode("latin-1", "replace")
    chunk = (struct.pack(">I", len(body)) + b"tEXt" + body
             + struct.pack(">I", zlib.crc32(b"tEXt" + body)))
    end = 8 + 8 + 13 + 4  # signature, then IHDR (length, tag, 13 bytes, CRC)
    return png[:end] + chunk + png[end:]


def plot_samples(path: str, sets: dict, lim: float) -> str:
    """Fig. 4: one scatter panel per sample set, with matplotlib (titles, as in the paper) when
    it is installed, else drawn by :func:`render_panels` (no titles in the picture: panels in
    the order of ``sets``, named in the PNG's Title text). Returns ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..imageio import atomic_write_bytes

        title = "Fig. 4, left to right: " + ", ".join(sets) + f" (square [-{lim:g}, {lim:g}]^2)"
        atomic_write_bytes(path, _png_with_title(render_panels(sets, lim), title))
        return path
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 4.2))
    for ax, (title, x) in zip(axes, sets.items()):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1.5, alpha=0.5, lw=0)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def run_demo(out: str | None = "vaebm-demo-out", *, paper: bool = False, plot: bool = True,
             log=print, **overrides) -> dict:
    """Train the VAE and the energy on 25 Gaussians, estimate log Z, evaluate test log-likelihoods.
    ``overrides`` are :class:`DemoConfig` fields. Writes results.json, vae.pt, energy.pt,
    samples.npz-like samples.pt and fig4.png (matplotlib, else a numpy drawing) to ``out``
    (nothing if ``out`` is None). Each stage reports through ``log``: its name, then a progress
    line every few seconds (``$VAEBM_PROGRESS_INTERVAL``, default 5) and one when it ends."""
    cfg = DemoConfig.paper(**overrides) if paper else DemoConfig(**overrides)
    t0 = time.time()
    timings = {}
    torch.manual_seed(cfg.seed)
    data = get_dataset(cfg.dataset)
    x_test = data.sample(cfg.n_test, _gen(cfg.seed, 4))
    log(f"vaebm demo: {cfg.dataset}, protocol {'paper' if paper else 'default'} "
        f"({cfg.n_test} test points, IWAE K={cfg.iwae_k}), seed {cfg.seed}, "
        f"{torch.get_num_threads()} threads")

    vae = ToyVAE(2, cfg.latent_dim, cfg.hidden, cfg.layers)
    energy = ToyEnergy(2, cfg.hidden, cfg.layers, input_scale=cfg.energy_input_scale)
    log(f"stage 1/4: VAE ({cfg.vae_steps} steps of batch {cfg.vae_batch})")
    train_vae(vae, data, cfg, log)
    timings["vae_train_s"] = time.time() - t0
    log(f"stage 2/4: energy, VAE frozen ({cfg.ebm_steps} steps of batch {cfg.ebm_batch}, "
        f"{cfg.ld_steps} MALA steps each)")
    t = time.time()
    hist = train_energy(vae, energy, data, cfg, log)
    energy = hist["ema"].eval()
    timings["ebm_train_s"] = time.time() - t

    log(f"stage 3/4: evaluation, log Z on a {cfg.grid_n}^2 grid from {cfg.z_samples} prior "
        f"draws, IWAE (K={cfg.iwae_k}) on {cfg.n_test} test points")
    t = time.time()
    with _stage(log, cfg.z_samples, "stage 3/4 log Z", "prior draws") as bar:
        lz = log_partition(vae, energy, lim=data.extent + 1.0, grid_n=cfg.grid_n,
                           n_samples=cfg.z_samples, generator=_gen(cfg.seed, 5), x_check=x_test,
                           on_chunk=lambda done, total: bar.moveto(done))
    timings["log_z_s"] = time.time() - t
    t = time.time()
    with _stage(log, cfg.n_test, "stage 3/4 IWAE", "test points") as bar:
        ll = heldout_log_likelihoods(vae, energy, x_test, iwae_k=cfg.iwae_k, log_z=lz["log_z"],
                                     generator=_gen(cfg.seed, 6),
                                     on_chunk=lambda done, total: bar.moveto(done))
    timings["iwae_s"] = time.time() - t
    ll_true = float(data.log_prob(x_test).double().mean())
    ll_vae, ll_vaebm = float(ll["vae"].mean()), float(ll["vaebm"].mean())
    # the same figures with log p_vae from the grid's cell masses instead of IWAE (no bound)
    cross = {"vae": lz["vae_ll_grid"],
             "vaebm": lz["vae_ll_grid"] - float(ll["energy"].mean()) - lz["log_z"],
             "test_points_inside_grid": lz["x_check_inside"]}
    log(f"  log Z {lz['log_z']:.4f} (plain Monte Carlo {lz['log_z_mc']:.4f}); without IWAE "
        f"(grid cell densities): VAE {cross['vae']:.3f}, VAEBM {cross['vaebm']:.3f}")

    log(f"stage 4/4: {cfg.n_plot} samples of each model ({cfg.sample_steps} MALA steps)")
    t = time.time()
    x_vae = vae.sample(cfg.n_plot, _gen(cfg.seed, 7))
    with _stage(log, cfg.sample_steps, "stage 4/4 samples", "MALA steps") as bar:
        x_ebm = sample_vaebm(vae, energy, cfg.n_plot, cfg.sample_steps, hist["final_step_size"],
                             seed=cfg.seed, mala=cfg.mala, mh_every=10 if cfg.prior_mh else 0,
                             backend=cfg.backend, on_step=lambda done, total: bar.moveto(done))
    x_true = data.sample(cfg.n_plot, _gen(cfg.seed, 8))
    timings["sample_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    res = {
        "protocol": "paper" if paper else "default",
        "config": dataclasses.asdict(cfg),
        "data": {"name": cfg.dataset, "component_std": float(data.std[0]),
                 "mean_spacing": float((data.means[1] - data.means[0]).abs().max()),
                 "separated_expected_ll": -data.separated_entropy()},
        "test_ll": {"vae": ll_vae, "vaebm": ll_vaebm, "true": ll_true},
        "gap_to_true": {"vae": ll_true - ll_vae, "vaebm": ll_true - ll_vaebm},
        "paper": {"test_ll": PAPER, "gap_to_true": {"vae": 1.87, "vaebm": 0.40}},
        "log_z": lz,
        "test_ll_grid_cross_check": cross,
        "energy_test_mean": float(ll["energy"].mean()),
        "ebm_final_accept": sum(hist["accept"][-50:]) / max(1, len(hist["accept"][-50:])),
        "ebm_final_mh_accept": sum(hist["mh_accept"][-50:]) / max(1, len(hist["mh_accept"][-50:])),
        "ebm_final_step_size": hist["final_step_size"],
        "mode_fraction": {"true": mode_fraction(data, x_true), "vae": mode_fraction(data, x_vae),
                          "vaebm": mode_fraction(data, x_ebm)},
        "timings": timings,
        "figure": None,
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        if plot:
            res["figure"] = plot_samples(os.path.join(out, "fig4.png"),
                                         {"true data": x_true, "VAE": x_vae, "VAEBM": x_ebm},
                                         lim=data.extent)
        _atomic_save({"config": res["config"], "state_dict": vae.state_dict()},
                     os.path.join(out, "vae.pt"))
        _atomic_save({"config": res["config"], "state_dict": energy.state_dict()},
                     os.path.join(out, "energy.pt"))
        _atomic_save({"true": x_true, "vae": x_vae, "vaebm": x_ebm},
                     os.path.join(out, "samples.pt"))
        _atomic_save(res, os.path.join(out, "results.json"))
    return res


def format_table(res: dict) -> str:
    ll, gap, p = res["test_ll"], res["gap_to_true"], res["paper"]
    rows = [f"{'model':8s} {'test LL (nats)':>15s} {'gap to true':>12s} {'paper LL':>9s} {'paper gap':>10s}"]
    for k, name in (("vae", "VAE"), ("vaebm", "VAEBM"), ("true", "true")):
        g = f"{gap[k]:12.3f}" if k in gap else f"{'':12s}"
        pg = f"{p['gap_to_true'][k]:10.2f}" if k in p["gap_to_true"] else f"{'':10s}"
        rows.append(f"{name:8s} {ll[k]:15.3f} {g} {p['test_ll'][k]:9.2f} {pg}")
    return "\n".join(rows)
