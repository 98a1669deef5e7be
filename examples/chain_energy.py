"""How far do VAEBM's chains get? The energy net's mean value on samples along one long chain.

    python examples/chain_energy.py --vae RUN/vae --ebm RUN/ebm --out docs/img/stage2_cpu_chain/s0.json \
        [--n 200] [--steps 128] [--every 16] [--data fashion_mnist]

Draws ``--n`` chains of ``--steps`` Langevin steps (the stage-2 run's step size and energy mode)
from the VAE's samples, records a frame every ``--every`` steps, and writes the mean E(x) of the
decoded samples at each frame, beside the mean E of as many test images. If the samples' energy
is still far above the data's at the run's test_ld_steps, the chains are too short for the
energy to act (see the results page).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_lib import provenance, sampling_settings  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--ebm", required=True)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--data", default="fashion_mnist", help="dataset of the test images")
    p.add_argument("--data-root", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for k in ("n", "steps", "every"):
        if getattr(a, k) < 1:
            p.error(f"--{k} must be >= 1")
    from vaebm.data import get_dataset
    from vaebm.loading import load_ebm, load_vae
    from vaebm.sampling.generate import vaebm_sample

    vae, _ = load_vae(a.vae)
    energy, ck = load_ebm(a.ebm)
    vae.eval(), energy.eval()
    s = sampling_settings(ck.get("config") or {})
    t0 = time.time()
    r = vaebm_sample(vae, energy, a.n, steps=a.steps, step_size=s["step_size"],
                     batch=min(100, a.n), mode=s["mode"], negative=s["negative"], seed=a.seed,
                     every=a.every)
    frames = [r["initial"]] + list(r["chain"])
    with torch.no_grad():
        es = [float(energy(f.clamp(0, 1)).mean()) for f in frames]
        test = get_dataset(a.data, root=a.data_root, split="test").as_tensors()[0][:a.n]
        ed = float(energy(test).mean())
    out = {"ebm": str(a.ebm), "ebm_iteration": ck.get("iteration"), "n": a.n,
           "steps": [a.every * i for i in range(len(frames))], "mean_energy": es,
           "test_images_mean_energy": ed, "step_size": s["step_size"],
           "seconds": time.time() - t0, "provenance": provenance(sys.argv)}
    out["provenance"]["command"] = "python examples/chain_energy.py " + " ".join(sys.argv[1:])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("steps", "mean_energy", "test_images_mean_energy")}))


if __name__ == "__main__":
    main()
