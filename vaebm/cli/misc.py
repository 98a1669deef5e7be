"""``vaebm backends``, ``vaebm info`` and ``vaebm demo``."""

from __future__ import annotations


def cmd_backends(args) -> int:
    """Which kernel backends can run here; builds every extension (the Langevin kernels and the
    network kernels: Swish, weight norm, depthwise conv) so later commands start at once."""
    import torch

    from ..ops import _registry, available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for name, reason in available_backends(dev).items():
            if reason is None:
                # the backend's other extensions: its network kernels
                for key in _registry._BACKEND_EXTS.get(name, ())[1:]:
                    try:
                        _registry.load_extension(key)
                    except Exception as e:  # a build failure: the layers fall back to PyTorch
                        reason = f"Langevin kernels ok; network kernels failed to build: {e}"
            print(f"{dev:5s} {name:7s} {'ok' if reason is None else 'unavailable: ' + reason}")
    return 0

def cmd_info(args) -> int:
    """Parameter counts of the energy networks (the four of Table 7 unless presets are named)
    and of the NVAE presets (``--nvae``)."""
    from ..models.energy import PAPER_PRESETS, describe

    if args.nvae:
        from ..models.nvae import describe as describe_nvae
        print(describe_nvae())
        return 0
    for i, preset in enumerate(args.presets or PAPER_PRESETS):
        print(("\n" if i else "") + describe(preset, width=args.width))
    return 0

def cmd_demo(args) -> int:
    """The 2-D likelihood experiment of Sec. 5.4 (25 Gaussians, embedded: nothing to download)."""
    from .._progress import quiet
    from ..toy.experiment import format_table, run_demo

    # stage names and progress every few seconds; --quiet: only the results
    log = (lambda *a: None) if quiet() else (lambda line: print(line, flush=True))
    res = run_demo(args.out, paper=args.paper, plot=not args.no_plot, seed=args.seed, log=log)
    print(format_table(res))
    t = res["timings"]["total_s"]
    print(f"finished in {t:.0f} s; results, models and samples in {args.out}"
          + (f"; figure {res['figure']}" if res["figure"] else ""))
    return 0
