"""Sampling speed, VAEBM against NCSN (paper Sec. 5.5 / Appendix J), on one machine in one run.

    python benchmarks/sample_speed.py                  # CPU defaults: a few minutes on 2 cores
    python benchmarks/sample_speed.py --n 50           # the paper's setting (GPU: full chains)
    python benchmarks/sample_speed.py --quick          # seconds, tiny networks (CI)

VAEBM (cifar10 presets: NVAE backbone + EnergyNet, 16 Langevin steps of size 8e-5 in eps-space,
output the decoder mean of the last state) in three modes:

- ``published``: the published sampling loop's way: ``.backward()`` on the batch mean, a Python
  update per tensor ``eps <- eps - eta/2 * B * grad + sqrt(eta) * N(0, 1)`` over the 31 tensors,
  noise drawn into preallocated buffers, weight norm recomputed every forward, and the host sync
  of the published decoder's ``assert x.max() <= 1 and x.min() >= 0`` every step.
- ``eager``: the same maths, clean: ``autograd.grad`` w.r.t. eps only, no host syncs.
- ``optimised``: :class:`vaebm.FusedLangevin` (fastest backend: cpp on CPU, cuda on GPU; its
  per-chain non-finite guard on), decoder and energy frozen (normalised weights cached, BN
  folded; on a CPU the decoder's 1x1 convs run on oneDNN and its depthwise convs on vaebm's C++
  kernel, see vaebm/ops/conv.py), energy in channels_last, the whole step replayed as a CUDA
  graph on a GPU (captured during the warm-up, once per batch shape).

NCSN v1 (1000 evaluations) and NCSNv2 (1161) from ``ncsn.py``, modes ``published`` (the released
loop: v1 copies the clamped image to the host before every step) and ``eager``.

Every row uses the same precision policy (``--precision``). On a CPU a full NCSN chain takes
hours: the sampler runs ``--ncsn-steps`` steps at every level (v1) or at ``--ncsn-levels`` evenly
spaced levels plus the denoising step (v2) after a warm-up evaluation, and the chain time is
extrapolated (each step at any level is the same work); such rows are marked ``extrapolated``.
A chain is run in full when its estimate is under ``--full-budget`` seconds (GPU default 600).
Network evaluations are counted by forward hooks (``evals_hooked``; CUDA-graph replays run no
hooks). VAEBM modes are timed ``--repeat`` times, interleaved; ``seconds`` is the median and
``seconds_min`` the minimum (NCSN: median and minimum step times x evaluations). On a shared CPU
the minimum is the steadier figure: oversubscribed cores stall OpenMP barriers (``--threads 1``
avoids that). Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS
(VmHWM, reset before each row) on a CPU. Results: markdown on stdout, CSV and JSON under
``benchmarks/results/`` (or ``--out``), with machine, versions, git revision and load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # a checkout works without install
from _harness import RESULTS, git_rev, machine, markdown, sync  # noqa: E402
import ncsn  # noqa: E402
from _speed_parts import (EvalCounter, PeakMemory, StandInVAE, _autocast, _freeze,  # noqa: E402,F401
                          _unfreeze, build_energy, build_vae, precision_context)

from vaebm.models.eps_space import eps_energy_fn  # noqa: E402
from vaebm.sampling import FusedLangevin  # noqa: E402
from vaebm.sampling.generate import frozen_params  # noqa: E402

STEPS, ETA = 16, 8e-5  # CIFAR-10 test-time Langevin (Table 8)
VAEBM_MODES = ("published", "eager", "optimised")
NCSN_MODES = ("published", "eager")
COLUMNS = ["model", "mode", "precision", "n", "evals_per_chain", "evals_timed", "evals_hooked",
           "seconds", "seconds_min", "extrapolated", "ms_per_eval", "samples_per_s", "peak_mem_MiB",
           "mem_delta_MiB", "mem_kind", "ratio_vs_vaebm_published", "ratio_vs_vaebm_optimised"]


# --------------------------------------------------------------------------- VAEBM chains
class VAEBMRunner:
    """Runs ``steps`` eps-space Langevin steps on ``n`` chains in one of :data:`VAEBM_MODES` and
    returns the decoder mean of the last state, (n, 3, H, W)."""

    def __init__(self, vae, energy, *, mode, steps=STEPS, eta=ETA, energy_mode="official",
                 device="cpu", autocast=None, backend=None, graphs=True):
        if mode not in VAEBM_MODES:
            raise ValueError(f"mode must be one of {VAEBM_MODES}, got {mode!r}")
        self.vae, self.energy, self.mode, self.steps, self.eta = vae, energy, mode, steps, eta
        self.energy_mode, self.device, self.autocast = energy_mode, torch.device(device), autocast
        self.backend = backend
        self.graphs = graphs and mode == "optimised" and self.device.type == "cuda"
        self._sampler = None
        self.note = ""

    def _energy_fn(self, check=False):
        def checked(x, _e=self.energy):
            # the published decoder's log_prob asserts on values: a host sync per step
            assert x.max() <= 1.0 and x.min() >= 0.0
            return _e(x)

        fn, lam = eps_energy_fn(self.vae, checked if check else self.energy, self.energy_mode)
        ac, dev = self.autocast, self.device

        def wrapped(state):
            with _autocast(dev, ac):
                return fn(state).float()

        return wrapped, lam

    def setup(self):
        if self.mode == "optimised":
            _freeze(self.vae, channels_last=False)
            _freeze(self.energy, channels_last=True)
        else:
            _unfreeze(self.vae)
            _unfreeze(self.energy)

    def teardown(self):
        _unfreeze(self.vae)
        _unfreeze(self.energy)

    def init_eps(self, n, generator=None):
        return [torch.randn(s, device=self.device, generator=generator)
                for s in self.vae.eps_shapes(n)]

    def run(self, n, generator=None):
        eps = self.init_eps(n, generator)
        with frozen_params(self.vae, self.energy):
            getattr(self, "_" + self.mode)(eps)
            with torch.no_grad(), _autocast(self.device, self.autocast):
                return self.vae.decode_eps(eps).x_mean.float()

    def _published(self, eps):
        fn, lam = self._energy_fn(check=True)
        B = eps[0].shape[0]
        for e in eps:
            e.requires_grad_(True)
        noise = [torch.empty_like(e) for e in eps]
        for _ in range(self.steps):
            d = fn(eps)
            if lam:
                d = d + 0.5 * lam * sum(e.square().flatten(1).sum(1) for e in eps)
            d.mean().backward()
            for e, z in zip(eps, noise):
                z.normal_(0, 1)
                e.data.add_(e.grad.data * B, alpha=-0.5 * self.eta)
                e.data.add_(z.data, alpha=math.sqrt(self.eta))
                e.grad.detach_()
                e.grad.zero_()
        for e in eps:
            e.requires_grad_(False)

    def _eager(self, eps):
        fn, lam = self._energy_fn()
        for _ in range(self.steps):
            xs = [e.detach().requires_grad_(True) for e in eps]
            with torch.enable_grad():
                d = fn(xs).sum()
                if lam:
                    d = d + 0.5 * lam * sum(x.square().sum() for x in xs)
                grads = torch.autograd.grad(d, xs)
            with torch.no_grad():
                for e, g in zip(eps, grads):
                    e.add_(g, alpha=-0.5 * self.eta)
                    e.add_(torch.randn_like(e), alpha=math.sqrt(self.eta))

    def _optimised(self, eps):
        fn, lam = self._energy_fn()
        if not self.graphs:
            s = FusedLangevin(eps, self.eta, lam=lam, backend=self.backend, track=False,
                              seed=0, max_steps=max(1, self.steps))
            for _ in range(self.steps):
                s.step(fn)
            return
        s = self._sampler
        if s is None or [t.shape for t in s.state] != [e.shape for e in eps]:
            s = self._sampler = FusedLangevin([e.clone() for e in eps], self.eta, lam=lam,
                                              backend=self.backend, track=False, seed=0,
                                              capturable=True, max_steps=max(1, self.steps))
        for buf, e in zip(s.state, eps):  # fresh chains in the captured buffers
            buf.copy_(e)
        try:
            for _ in range(self.steps):
                s.graph_step(fn)
        except Exception as exc:  # capture-unsafe energy: fall back to eager steps, say so
            self.graphs, self._sampler = False, None
            self.note = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); eager steps"
            return self._optimised(eps)
        for buf, e in zip(s.state, eps):
            e.copy_(buf)


def time_vaebm(vae, energy, modes, n, *, steps, eta, energy_mode, device, autocast, backend,
               seed=0, graphs=True, repeat=1) -> list[dict]:
    """One row per mode: median (and min) wall time of ``repeat`` full chains of ``n`` samples,
    the modes interleaved round by round so that load from other jobs hits them alike; peak
    memory; evaluations counted by a hook on the energy net (= steps x n per chain).

    Each mode is warmed up first with a 1-step chain (kernel builds, allocator, cudnn autotune;
    on a GPU the optimised mode also captures its CUDA graph then). The optimised mode runs on
    frozen deep copies, so the captured graph's cached weights stay alive and the other modes
    keep recomputing weight norms from the parameters."""
    gen = torch.Generator(device=device).manual_seed(seed)
    runners = {}
    for mode in modes:
        v, e = (copy.deepcopy(vae), copy.deepcopy(energy)) if mode == "optimised" else (vae, energy)
        kw = dict(eta=eta, energy_mode=energy_mode, device=device, autocast=autocast,
                  backend=backend)
        r = VAEBMRunner(v, e, mode=mode, steps=steps, graphs=graphs, **kw)
        r.setup()
        VAEBMRunner(v, e, mode=mode, steps=1, graphs=False, **kw).run(n, gen)  # warm-up
        if r.graphs:
            r.run(n, gen)  # captures the graph for this batch shape
        runners[mode] = r
    sync(device)
    times = {m: [] for m in modes}
    peak = {m: None for m in modes}
    hooked, finite = {}, {}
    for _ in range(max(1, repeat)):
        for mode, r in runners.items():
            counter = EvalCounter(r.energy)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                x = r.run(n, gen)
                sync(device)
                times[mode].append(time.perf_counter() - t0)
            counter.close()
            hooked[mode] = counter.samples
            finite[mode] = bool(torch.isfinite(x).all())
            if peak[mode] is None or mem.peak > peak[mode].peak:
                peak[mode] = mem
    rows = []
    for mode, r in runners.items():
        ts = times[mode]
        rows.append({"model": "VAEBM", "mode": mode, "seconds": statistics.median(ts),
                     "seconds_min": min(ts), "runs": len(ts), "evals_per_chain": steps,
                     "evals_timed": steps, "evals_hooked": hooked[mode], "extrapolated": False,
                     **peak[mode].row(),
                     "note": r.note + ("" if finite[mode] else " non-finite output")})
        r.teardown()
    return rows


# --------------------------------------------------------------------------- NCSN chains
def time_ncsn(model, schedule, mode, n, *, device, autocast, steps_timed, levels_timed,
              budget_s, seed=0):
    """Time ``mode`` annealed Langevin on ``n`` chains: a subset (``steps_timed`` steps at each
    of ``levels_timed`` evenly spaced levels, all levels if None, plus v2's denoising step),
    then the full chain if its estimate fits ``budget_s``, else extrapolate."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = ncsn.init_uniform(n, model.channels, device=device, generator=gen)
    L = len(schedule.sigmas)
    with torch.no_grad(), _autocast(device, autocast):  # warm-up evaluation
        model(x0, torch.zeros(n, dtype=torch.long, device=device))
    sync(device)
    k = levels_timed or L
    levels = sorted({round(i * (L - 1) / max(1, k - 1)) for i in range(k)}) if k < L else None
    note = ""

    def run(**kw):
        nonlocal note
        counter = EvalCounter(model)
        stamps = []  # per-step wall times (CPU: no sync needed to read them)
        cb = None if dev_type == "cuda" else (lambda _: stamps.append(time.perf_counter()))
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            try:
                res = ncsn.annealed_langevin(model, x0, schedule, mode=mode, generator=gen,
                                             autocast_dtype=autocast, callback=cb, **kw)
                ev = res.evaluations
            except FloatingPointError as e:  # random weights: the timing still stands
                note, ev = f"non-finite chain ({e})", None
            sync(device)
            secs = time.perf_counter() - t0
        counter.close()
        ev = ev if ev is not None else counter.samples // n
        steps = [b - a for a, b in zip([t0] + stamps, stamps)]
        return secs, ev, counter.samples, mem, steps

    dev_type = torch.device(device).type
    secs, ev, hooked, mem, steps = run(levels=levels, steps_each=steps_timed)
    full = schedule.evaluations
    # every step is the same work: the median step is robust to other jobs on a shared machine
    est = statistics.median(steps) * full if steps else secs * full / ev
    row = {"evals_per_chain": full, "evals_timed": ev, "seconds_timed": secs,
           "seconds_min": min(steps) * full if steps else est}
    if ev < full and est <= budget_s:
        secs, ev, hooked, mem, _ = run()
        row.update(evals_timed=ev, seconds_timed=secs, seconds_min=secs)
        est = secs
    row.update({"seconds": est, "extrapolated": ev < full, "evals_hooked": hooked, **mem.row(),
                "note": note})
    return row


# --------------------------------------------------------------------------- driver
def parse(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--n", type=int, default=None, help="samples (one batch); default 50 on a "
                   "GPU, 4 on a CPU, 2 with --quick")
    p.add_argument("--steps", type=int, default=STEPS, help="VAEBM Langevin steps")
    p.add_argument("--eta", type=float, default=ETA)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="applied to every row: strict fp32, TF32 matmul/conv (GPU), bf16 autocast")
    p.add_argument("--energy-mode", choices=["official", "paper"], default="official",
                   help="eps-space energy (official: what the published code differentiates)")
    p.add_argument("--vae", choices=["auto", "nvae", "standin"], default="auto")
    p.add_argument("--backend", default=None, help="FusedLangevin backend (default: fastest)")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs in optimised mode")
    p.add_argument("--ncsn", default="v1,v2", help="which NCSN versions (v1,v2 or none)")
    p.add_argument("--vaebm-modes", default=",".join(VAEBM_MODES))
    p.add_argument("--ncsn-modes", default=",".join(NCSN_MODES))
    p.add_argument("--ncsn-steps", type=int, default=None,
                   help="timed steps per level before extrapolating (default 1 CPU, 2 GPU)")
    p.add_argument("--ncsn-levels", type=int, default=10, help="v2 levels timed (of 232)")
    p.add_argument("--full-budget", type=float, default=None,
                   help="run a full NCSN chain when its estimate is under this many seconds "
                   "(default 600 on a GPU, 0 on a CPU)")
    p.add_argument("--quick", action="store_true", help="tiny networks, seconds (CI)")
    p.add_argument("--repeat", type=int, default=None, help="VAEBM chains timed per mode, "
                   "interleaved (median and min reported); default 3 GPU, 2 CPU, 1 --quick")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: "
                   "torch's; 1 with --quick, which keeps CI timings sane on a loaded machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="file name stem (default sample_speed[-quick])")
    a = p.parse_args(argv)
    gpu = torch.device(a.device).type == "cuda"
    a.n = a.n or (2 if a.quick else 50 if gpu else 4)
    a.ncsn_steps = a.ncsn_steps or (2 if gpu else 1)
    a.repeat = a.repeat or (1 if a.quick else 3 if gpu else 2)
    a.full_budget = (600.0 if gpu else 0.0) if a.full_budget is None else a.full_budget
    if a.quick:
        a.steps = min(a.steps, 3)
        a.threads = a.threads or 1
        a.ncsn_levels = min(a.ncsn_levels, 4)
    return a


def run(a) -> tuple[list[dict], dict]:
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    elif dev.type == "cpu" and (_load() or 0) > (os.cpu_count() or 1):
        print(f"warning: load average {_load()} exceeds the {os.cpu_count()} CPUs: "
              f"{torch.get_num_threads()}-thread timings will stall on OpenMP barriers; "
              "consider --threads 1", file=sys.stderr)
    ac = precision_context(a.precision, dev)
    torch.manual_seed(a.seed)
    rows, load0 = [], _load()
    preset = "tiny" if a.quick else "cifar10"
    vae, vae_desc = build_vae(preset, a.vae, dev)
    energy = build_energy(preset, dev, seed=a.seed)
    modes = [m for m in a.vaebm_modes.split(",") if m]
    if modes:
        rows += time_vaebm(vae, energy, modes, a.n, steps=a.steps, eta=a.eta,
                           energy_mode=a.energy_mode, device=dev, autocast=ac, backend=a.backend,
                           seed=a.seed, graphs=not a.no_graphs, repeat=a.repeat)
        for r in rows:
            _progress(r)
    versions = [v for v in a.ncsn.split(",") if v and v != "none"]
    for v in versions:
        sched = ncsn.NCSN_V1 if v == "v1" else ncsn.NCSN_V2
        kw = {"ngf": 8} if a.quick else {}
        model = (ncsn.ncsn_v1 if v == "v1" else ncsn.ncsn_v2)(**kw).to(dev).eval()
        model.requires_grad_(False)
        for mode in [m for m in a.ncsn_modes.split(",") if m]:
            r = time_ncsn(model, sched, mode, a.n, device=dev, autocast=ac,
                          steps_timed=a.ncsn_steps, levels_timed=None if v == "v1" else
                          a.ncsn_levels, budget_s=a.full_budget, seed=a.seed)
            rows.append({"model": f"NCSN {v}", "mode": mode, **r})
            _progress(rows[-1])
        del model
    ref = {r["mode"]: r["seconds"] for r in rows if r["model"] == "VAEBM"}
    for r in rows:
        r["precision"] = a.precision
        r["n"] = a.n
        r["ms_per_eval"] = 1e3 * r["seconds"] / r["evals_per_chain"]
        r["samples_per_s"] = a.n / r["seconds"]
        for m in ("published", "optimised"):
            r[f"ratio_vs_vaebm_{m}"] = r["seconds"] / ref[m] if m in ref else float("nan")
    meta = {
        "machine": machine(dev), "device": str(dev), "git": git_rev(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "load_avg_1m_start": load0, "load_avg_1m_end": _load(),
        "precision": a.precision, "vae": vae_desc, "energy": f"EnergyNet({preset!r})", "energy_mode": a.energy_mode, "vaebm_steps": a.steps,
        "eta": a.eta, "ncsn_steps_timed_per_level": a.ncsn_steps,
        "ncsn_v2_levels_timed": a.ncsn_levels, "full_budget_s": a.full_budget,
        "quick": a.quick, "n": a.n,
    }
    return rows, meta


def _progress(r):
    ex = " (extrapolated)" if r["extrapolated"] else ""
    print(f"[sample_speed] {r['model']} {r['mode']}: {r['seconds']:.4g} s{ex}", file=sys.stderr,
          flush=True)


def _load():
    """1-minute load average (other jobs on a shared machine skew every timing)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def summary(rows) -> list[str]:
    """One line per headline ratio; a ratio built on an extrapolated row says so."""
    get = {(r["model"], r["mode"]): r["seconds"] for r in rows}
    mins = {(r["model"], r["mode"]): r.get("seconds_min", r["seconds"]) for r in rows}
    extra = {(r["model"], r["mode"]) for r in rows if r.get("extrapolated") in (True, "yes", "True")}

    def mark(*keys):
        named = [f"{m} {mode}" for m, mode in keys if (m, mode) in extra]
        return f" [extrapolated: {', '.join(named)} timed on part of its chain]" if named else ""

    out = []
    pairs = [("NCSN v1", "published", "published", "paper Appendix J setting; paper: 12x"),
             ("NCSN v1", "eager", "optimised", "target >= 18x"),
             ("NCSN v2", "eager", "optimised", "")]
    for m, nm, vm, what in pairs:
        if (m, nm) in get and ("VAEBM", vm) in get:
            out.append(f"{m} {nm} / VAEBM {vm}: {get[m, nm] / get['VAEBM', vm]:.1f}x "
                       f"(by min times {mins[m, nm] / mins['VAEBM', vm]:.1f}x)"
                       + (f"; {what}" if what else "") + mark((m, nm), ("VAEBM", vm)))
    if ("VAEBM", "published") in get and ("VAEBM", "optimised") in get:
        out.append(f"VAEBM published / optimised: "
                   f"{get['VAEBM', 'published'] / get['VAEBM', 'optimised']:.2f}x (by min times "
                   f"{mins['VAEBM', 'published'] / mins['VAEBM', 'optimised']:.2f}x); target >= 2x"
                   + mark(("VAEBM", "published"), ("VAEBM", "optimised")))
    return out


def write(rows, meta, out_dir, stem):
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    dev = meta["device"].split(":")[0]
    csv_path, json_path = out / f"{stem}-{dev}.csv", out / f"{stem}-{dev}.json"
    import csv
    keys = COLUMNS + ["note"] + [k for k in meta if k not in COLUMNS]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: v for k, v in meta.items()}})
    json_path.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary(rows)},
                                    indent=1, default=str))
    return csv_path, json_path


def main(argv=None):
    a = parse(argv)
    rows, meta = run(a)
    print(f"\nSampling speed, {a.n} CIFAR-10-sized samples, precision {a.precision}, "
          f"{meta['device']}\nmachine: {meta['machine']}\nVAEBM: {meta['vae']} + "
          f"{meta['energy']}, {a.steps} Langevin steps, eta {a.eta:g}, energy {a.energy_mode}; "
          f"memory: {rows[0]['mem_kind'] if rows else ''}; {meta['threads']} threads, load "
          f"average {meta['load_avg_1m_start']} -> {meta['load_avg_1m_end']}\n")
    shown = [{**r, "extrapolated": "yes" if r["extrapolated"] else ""} for r in rows]
    print(markdown(shown, [c for c in COLUMNS if c != "mem_kind"]))
    for line in summary(rows):
        print(line)
    notes = [f"{r['model']} {r['mode']}: {r['note']}" for r in rows if r.get("note")]
    for line in notes:
        print("note:", line)
    paths = write(rows, meta, a.out, a.tag or ("sample_speed-quick" if a.quick else "sample_speed"))
    print("\nwrote", *paths)
    return rows, meta


if __name__ == "__main__":
    main()
