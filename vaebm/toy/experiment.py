"""The 2-D likelihood experiment of Sec. 5.4: ``vaebm demo`` / :func:`run_demo`.

1. Stage 1: an MLP VAE trained by the ELBO on fresh 25-Gaussians samples.
2. Stage 2: the VAE frozen, an MLP energy trained by E(x_data).mean() - E(x_neg).mean() (Eq. 7)
   with negatives from persistent Langevin chains in eps-space on E(T(eps)) + |eps|^2/2 (Eq. 9),
   run by :func:`vaebm.langevin_sample`.
3. log Z = log int p_vae(x) exp(-E(x)) dx on a grid: for M prior draws z_m the decoder Gaussian's
   mass in every grid cell is exact (products of normal CDF differences, summed over m by one
   matrix product), so sum_cells mass(cell) * exp(-E(centre)) is an unbiased Monte Carlo estimate
   of the grid-cell integral with no IWAE bias; mass outside the grid is added from decoder samples
   that land there. Cross-check: the plain Monte Carlo E_{x ~ p_vae}[exp(-E(x))] on the same draws.
4. Test log-likelihoods: VAE by IWAE(K); VAEBM = IWAE(K) - E(x) - log Z; truth exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch

from ..sampling import langevin_sample
from .data import get_dataset
from .models import ToyEnergy, ToyVAE

PAPER = {"vae": -2.97, "vaebm": -1.50, "true": -1.10}


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
    # stage 2 (energy): Adam betas (0.99, 0.999) as the paper; persistent chains in eps-space
    ebm_steps: int = 800
    ebm_batch: int = 256
    ebm_lr: float = 1e-4
    ld_steps: int = 10
    ld_step_size: float = 0.02
    buffer_size: int = 10000
    reinit_prob: float = 0.05
    energy_l2: float = 0.01  # alpha * (E_pos^2 + E_neg^2): pins the free additive constant of E
    # evaluation
    n_test: int = 10000
    iwae_k: int = 1000
    grid_n: int = 512
    z_samples: int = 2**18
    n_plot: int = 3000
    sample_steps: int = 100
    backend: str | None = None  # Langevin backend (None: the library's default order)

    @classmethod
    def paper(cls, **kw):
        """The paper's evaluation protocol: 100,000 test points, IWAE with 10,000 samples."""
        return cls(**{"n_test": 100_000, "iwae_k": 10_000, "z_samples": 2**20, "grid_n": 1024,
                      **kw})


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def train_vae(vae: ToyVAE, data, cfg: DemoConfig, log=print) -> list[float]:
    gen = _gen(cfg.seed, 1)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps, eta_min=cfg.vae_lr / 20)
    warm = max(1, int(0.3 * cfg.vae_steps))
    losses = []
    vae.train()
    for it in range(cfg.vae_steps):
        x = data.sample(cfg.vae_batch, gen)
        loss = -vae.elbo(x, kl_weight=min(1.0, (it + 1) / warm)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (it + 1) % max(1, cfg.vae_steps // 4) == 0:
            log(f"  vae  step {it + 1:5d}/{cfg.vae_steps}  -elbo {sum(losses[-100:]) / len(losses[-100:]):.3f}")
    vae.eval()
    return losses


def eps_energy(vae: ToyVAE, energy):
    """energy_fn for the sampler: state [eps_z (B, latent), eps_x (B, 2)] -> E(T(eps)) (B,).
    The base density |eps|^2/2 of Eq. 9 is the sampler's ``lam=1`` term."""
    def fn(state):
        return energy(vae.decode_eps(state[0], state[1]))
    return fn


def train_energy(vae: ToyVAE, energy: ToyEnergy, data, cfg: DemoConfig, log=print) -> dict:
    """Stage 2 with the VAE frozen. Negatives: persistent chains (a buffer of (eps_z, eps_x);
    each chain restarts from N(0, I) with probability ``reinit_prob``) so the negatives follow the
    current model closely, which is what a density (not just a sampler) needs."""
    gen = _gen(cfg.seed, 2)
    vae.requires_grad_(False)
    opt = torch.optim.Adam(energy.parameters(), lr=cfg.ebm_lr, betas=(0.99, 0.999))
    buf = [torch.randn(cfg.buffer_size, vae.latent_dim, generator=gen),
           torch.randn(cfg.buffer_size, vae.data_dim, generator=gen)]
    fn = eps_energy(vae, energy)
    hist = {"loss": [], "e_pos": [], "e_neg": []}
    for it in range(cfg.ebm_steps):
        idx = torch.randperm(cfg.buffer_size, generator=gen)[:cfg.ebm_batch]
        state = [b[idx] for b in buf]
        fresh = torch.rand(cfg.ebm_batch, generator=gen) < cfg.reinit_prob
        for s in state:
            s[fresh] = torch.randn(int(fresh.sum()), s.shape[1], generator=gen)
        state = langevin_sample(fn, state, cfg.ld_steps, cfg.ld_step_size, lam=1.0,
                                seed=cfg.seed * 1_000_003 + it, backend=cfg.backend)
        for b, s in zip(buf, state):
            b[idx] = s
        with torch.no_grad():
            x_neg = vae.decode_eps(*state)
        x_pos = data.sample(cfg.ebm_batch, gen)
        e_pos, e_neg = energy(x_pos), energy(x_neg)
        loss = e_pos.mean() - e_neg.mean() + cfg.energy_l2 * (e_pos**2 + e_neg**2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"energy training diverged at step {it} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in (("loss", loss), ("e_pos", e_pos.mean()), ("e_neg", e_neg.mean())):
            hist[k].append(v.item())
        if (it + 1) % max(1, cfg.ebm_steps // 4) == 0:
            m = lambda k: sum(hist[k][-50:]) / len(hist[k][-50:])  # noqa: E731
            log(f"  ebm  step {it + 1:5d}/{cfg.ebm_steps}  E(data) {m('e_pos'):+.3f}  "
                f"E(neg) {m('e_neg'):+.3f}")
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
                  chunk: int = 8192, generator: torch.Generator | None = None) -> dict:
    """log Z = log int p_vae(x) exp(-E(x)) dx for a VAE with N(0, I) prior and diagonal Gaussian
    decoder over 2-D x; ``energy`` maps (N, 2) -> (N,). Returns the grid estimate ``log_z``, the
    plain Monte Carlo ``log_z_mc`` on the same prior draws, and the VAE mass inside the grid."""
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
    mass /= n_samples
    log_m = math.log(n_samples)
    lse_grid = torch.logsumexp((mass.log() - e_grid).flatten(), 0)
    lse_tail = torch.logsumexp(torch.cat(tail), 0) - log_m
    return {"log_z": float(torch.logaddexp(lse_grid, lse_tail)),
            "log_z_mc": float(torch.logsumexp(torch.cat(mc), 0) - log_m),
            "vae_mass_in_grid": float(mass.sum()), "grid_lim": lim, "grid_n": grid_n,
            "n_samples": n_samples}


@torch.no_grad()
def sample_vaebm(vae: ToyVAE, energy, n: int, steps: int, step_size: float, *, seed: int,
                 backend=None) -> torch.Tensor:
    """VAEBM samples: Langevin in eps-space from N(0, I), then x = T(eps) (Eq. 8)."""
    g = _gen(seed, 3)
    state = [torch.randn(n, vae.latent_dim, generator=g), torch.randn(n, vae.data_dim, generator=g)]
    state = langevin_sample(eps_energy(vae, energy), state, steps, step_size, lam=1.0,
                            seed=seed * 1_000_003 + 999_983, backend=backend)
    return vae.decode_eps(*state)


def mode_fraction(data, x: torch.Tensor, n_std: float = 3.0) -> float:
    """Fraction of samples within n_std component stds of some component mean."""
    d = torch.cdist(x.double(), data.means).min(1)
    return float((d.values <= n_std * data.std[d.indices]).double().mean())


def plot_samples(path: str, sets: dict, lim: float) -> str | None:
    """Fig. 4: one scatter panel per sample set. Returns None (and writes nothing) without
    matplotlib, which is an optional dependency."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
    samples.npz-like samples.pt and fig4.png to ``out`` (nothing if ``out`` is None)."""
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
    energy = ToyEnergy(2, cfg.hidden, cfg.layers)
    log("stage 1: VAE")
    train_vae(vae, data, cfg, log)
    timings["vae_train_s"] = time.time() - t0
    log("stage 2: energy (VAE frozen)")
    t = time.time()
    train_energy(vae, energy, data, cfg, log)
    energy.eval()
    timings["ebm_train_s"] = time.time() - t

    log("evaluation: log Z on a grid, IWAE on test points")
    t = time.time()
    lz = log_partition(vae, energy, lim=data.extent + 1.0, grid_n=cfg.grid_n,
                       n_samples=cfg.z_samples, generator=_gen(cfg.seed, 5))
    timings["log_z_s"] = time.time() - t
    t = time.time()
    iwae = vae.iwae(x_test, cfg.iwae_k, generator=_gen(cfg.seed, 6))
    with torch.no_grad():
        e_test = torch.cat([energy(x) for x in x_test.split(65536)])
    timings["iwae_s"] = time.time() - t
    ll_true = float(data.log_prob(x_test).double().mean())
    ll_vae = float(iwae.double().mean())
    ll_vaebm = float((iwae.double() - e_test.double()).mean() - lz["log_z"])

    t = time.time()
    x_vae = vae.sample(cfg.n_plot, _gen(cfg.seed, 7))
    x_ebm = sample_vaebm(vae, energy, cfg.n_plot, cfg.sample_steps, cfg.ld_step_size,
                         seed=cfg.seed, backend=cfg.backend)
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
        "energy_test_mean": float(e_test.mean()),
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
