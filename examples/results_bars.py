"""The image-quality bars section of the results page (examples/results_page.py), rendered from
the JSON files of examples/fashion_cpu_report.py and examples/stacked_cpu_report.py."""

from __future__ import annotations

from results_lib import fmt


def _table(head, rows) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _rollbacks(events: str) -> int:
    return sum("divergence" in ln for ln in events.splitlines())


def _bars(b: dict) -> list[str]:
    """The bars of the image-quality issue, from the report scripts' JSON files."""
    fb, sb, cv = b.get("fashion_bars") or [], b.get("stacked_bars") or [], b.get("curve") or []
    if not (fb or sb):
        return []
    L = ["## Does the energy improve the VAE? (the CPU recipes, measured)", "",
         "Presets `fashion_mnist_cpu` and `stacked_mnist_cpu` (both stages), trained on this "
         "2-core machine; VAE and VAEBM samples from the same starting noise (the VAE's samples "
         "are the chains' starts). Measured by `examples/fashion_cpu_report.py` and "
         "`examples/stacked_cpu_report.py` (full pages: [stage2_cpu.md](stage2_cpu.md), "
         "[stacked_cpu.md](stacked_cpu.md); commands, commit and machine in each JSON).", ""]
    rows = []
    if fb:
        ratios = [r["fid"]["ratio"] for r in fb if "fid" in r]
        n = fb[0].get("fid", {}).get("n")
        rows.append(["Fashion-MNIST FID(VAEBM) / FID(VAE) <= 0.5",
                     ", ".join(f"{x:.3f}" for x in ratios) + f" (n = {n} per model)",
                     "met" if ratios and max(ratios) <= 0.5 else "**not met**"])
        by = {r.get("ebm"): r for r in fb}
        for c in b.get("fashion_control") or []:
            r = by.get(c["ebm"], {})
            f = r.get("fid", {})
            rows.append(["(control, not a bar) the same chains with E = 0: what the noise alone "
                         "does", f"FID {c['fid']:.1f} (n = {c['n']}) against VAE "
                         f"{f.get('vae', float('nan')):.1f} and VAEBM "
                         f"{f.get('vaebm', float('nan')):.1f} of {r.get('name', '?')}: the FID "
                         "gain is the energy's", ""])
        d = [r["ood"]["auroc_vaebm"] - r["ood"]["auroc_vae"] for r in fb]
        rows.append(["OOD Fashion-MNIST vs MNIST: AUROC(VAEBM) >= AUROC(VAE) + 0.3",
                     ", ".join(f"{r['ood']['auroc_vae']:.3f} -> {r['ood']['auroc_vaebm']:.3f}"
                               for r in fb),
                     "met" if d and min(d) >= 0.3 else "**not met**"])
    if sb:
        # judged on the runs measured with >= 10,000 samples; smaller ones are listed as checks
        big = [r for r in sb if r["vae"]["n_samples"] >= 10000]
        ok = [r["vaebm"]["modes"] >= r["vae"]["modes"] and r["vaebm"]["kl"] < r["vae"]["kl"]
              for r in big] or [False]
        rows.append(["StackedMNIST: modes(VAEBM) >= modes(VAE), lower KL, >= 10,000 samples",
                     "; ".join(f"{r['vae']['modes']} -> {r['vaebm']['modes']} modes, KL "
                               f"{r['vae']['kl']:.3f} -> {r['vaebm']['kl']:.3f} "
                               f"(n = {r['vae']['n_samples']})" for r in sb),
                     "met" if all(ok) else "**not met**"])
        for c in b.get("stacked_control") or []:
            m = c["modes"]
            rows.append(["(control, not a bar) the same chains with E = 0: what the noise alone "
                         "does", f"{m['modes']} modes, KL {m['kl']:.3f} (n = {m['n_samples']}): "
                         "the energy's own share is the VAEBM's gain over this", ""])
    runs = [("Fashion-MNIST " + r["name"], r["stage2"]["events"]) for r in fb] + \
           [("StackedMNIST " + r["name"], r["stage2"]["events"]) for r in sb]
    rb = [_rollbacks(ev) for _, ev in runs]
    rows.append(["no rollback in any of these runs", ", ".join(
        f"{nm}: {k}" for (nm, _), k in zip(runs, rb)), "met" if not any(rb) else "**not met**"])
    L += _table(["bar", "measured (one entry per stage-2 seed)", ""], rows) + [""]
    times = []
    for what, rs in (("Fashion-MNIST", fb), ("StackedMNIST", sb)):
        if rs:
            st1 = rs[0]["stage1"]
            times.append(f"{what}: stage 1 {st1['iterations']} iterations in "
                         f"{st1['seconds'] / 60:.0f} min; stage 2 " + ", ".join(
                             f"{r['stage2']['iterations']} iterations in "
                             f"{r['stage2']['seconds'] / 60:.0f} min" for r in rs))
    L += ["Training time (sum of the iterations' wall times): " + "; ".join(times) + ".", ""]
    if cv:
        cv = sorted(cv, key=lambda r: r["ebm_iteration"] or 0)
        L += ["Fashion-MNIST, one stage-2 run continued past its preset's 200 iterations "
              "(constant learning rate): FID of 2000 VAEBM samples against the same VAE's, by "
              "stage-2 iteration.", ""]
        L += _table(["stage-2 iteration", "FID VAE", "FID VAEBM", "ratio", "AUROC VAE",
                     "AUROC VAEBM", "max abs E", "rollbacks"],
                    [[r["ebm_iteration"], fmt(r["fid"]["vae"], 1), fmt(r["fid"]["vaebm"], 1),
                      fmt(r["fid"]["ratio"], 3), fmt(r["ood"]["auroc_vae"]),
                      fmt(r["ood"]["auroc_vaebm"]), fmt(r["stage2"]["max_abs_e"], 1),
                      _rollbacks(r["stage2"]["events"])] for r in cv]) + [""]
    ce = b.get("chain_energy") or []
    for r in ce:
        L += [f"Mean energy of {r['n']} VAEBM samples along one chain ({r['ebm']}, steps of "
              f"{r['step_size']:g} in eps-space; test images: "
              f"{r['test_images_mean_energy']:.1f}), from `examples/chain_energy.py`"
              + (f" ({r['note']})" if r.get("note") else "") + ":", ""]
        L += _table(["Langevin steps", *map(str, r["steps"])],
                    [["mean E(x)", *(f"{e:.1f}" for e in r["mean_energy"])]]) + [""]
    cl = sorted(b.get("chain_lengths") or [],
                key=lambda r: (r["settings"]["steps"], r["settings"]["step_size"]))
    if cl:
        L += ["The same energy net sampled with longer chains or larger steps (FID of "
              f"{cl[0]['fid']['n']} samples per model against 2000 training images, so not "
              "comparable with the 2000-sample rows above):", ""]
        L += _table(["Langevin steps", "step size", "FID VAE", "FID VAEBM", "ratio",
                     "mean E VAE samples", "mean E VAEBM samples", "mean E test images",
                     "sampling time"],
                    [[r["settings"]["steps"], f"{r['settings']['step_size']:g}",
                      fmt(r["fid"]["vae"], 1), fmt(r["fid"]["vaebm"], 1),
                      fmt(r["fid"]["ratio"], 3), fmt(r["energy"]["vae_samples"], 1),
                      fmt(r["energy"]["vaebm_samples"], 1), fmt(r["energy"]["test_images"], 1),
                      f"{r['sample_seconds']:.0f} s"] for r in cl]) + [""]
    return L


def _stacked_from_bars(b: dict):
    """The Table 5 section's input from a stacked_cpu_report JSON when no --stacked-run."""
    sb = b.get("stacked_bars") or []
    if not sb:
        return None
    r = sb[0]
    return {"run": r["ebm"], "settings": r["settings"], "classifier": r["classifier"],
            "sample_seconds": r["sample_seconds"], "vae": r["vae"], "vaebm": r["vaebm"],
            "data": r["data"], "ebm_events": r["stage2"]["events"].splitlines(),
            "images": r["name"]}
