"""``vaebm export``: the weights of a run's models as plain files for use outside vaebm.

A vaebm checkpoint is a framed, checksummed file holding optimiser, replay buffer, RNG states and
history besides the weights (see :mod:`vaebm.training.checkpoint`); ``torch.load`` does not open
it. ``vaebm export --vae RUN_OR_FILE --ebm RUN_OR_FILE --out DIR`` writes, for each model given:

- ``DIR/<kind>.pt``: a flat ``state_dict`` (parameter name -> tensor, every tensor its own
  contiguous CPU copy) that ``torch.load(path, weights_only=True)`` opens; or with
  ``--format safetensors``, ``DIR/<kind>.safetensors`` (the same tensors; needs the
  ``safetensors`` package), whose header metadata ``vaebm`` holds the JSON below;
- ``DIR/<kind>.json``: what rebuilds the model: ``class``, ``preset`` (the NVAE preset whose
  config the stored one equals, else null; the EnergyNet preset), ``config`` (the constructor
  arguments stored in the checkpoint: the NVAEConfig fields, or EnergyNet's preset, width,
  in_channels, resolution), ``rebuild`` (the Python expression), the source file, iteration,
  the run's training config, and the SHA-256 of the weights file.

``kind`` is ``vae`` or ``ebm``. The checkpoint or run folder is resolved as ``vaebm sample``
does (:func:`vaebm.loading.load_vae` / ``load_ebm``: a run folder means its ``vae.pt`` /
``ebm.pt``; a published NVAE checkpoint works as ``--vae``). All files are written together or
not at all (temporary files, then renames); an existing file is never replaced unless ``--force``.
"""

from __future__ import annotations

from ._common import UsageError

FORMATS = {"pt": "pt", "safetensors": "safetensors"}  # --format -> file extension


def _plain(obj):
    """``obj`` as JSON-ready values (str/int/float/bool/None, lists, dicts); anything else by
    its repr."""
    import json

    return json.loads(json.dumps(obj, default=repr))


def _flat_state_dict(model, what: str) -> dict:
    import torch

    sd = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):  # e.g. a module's _extra_state
            raise RuntimeError(f"{what}: state_dict entry {k!r} is a {type(v).__name__}, not a "
                               "tensor; it cannot be exported as plain weights")
        sd[k] = v.detach().to("cpu").clone().contiguous()  # no shared storage (safetensors)
    return sd


def _vae_entry(path) -> tuple[dict, dict]:
    """(state_dict, metadata) of the VAE at ``path``."""
    import dataclasses

    from ..loading import load_vae
    from ..models.nvae import PRESETS

    vae, info = load_vae(path, map_location="cpu")
    conf = dataclasses.asdict(vae.config)
    preset = next((name for name, c in PRESETS.items() if dataclasses.asdict(c) == conf), None)
    meta = {"kind": "vae", "class": "vaebm.models.nvae.NVAE", "preset": preset, "config": conf,
            "rebuild": "NVAE(NVAEConfig(**config))",
            "source": str(info.get("file") or info.get("path") or path),
            "source_format": info.get("format"),
            "iteration": info.get("iteration"), "training_config": info.get("config")}
    if info.get("format") == "official":
        meta.update(epoch=info.get("epoch"), global_step=info.get("global_step"))
    return _flat_state_dict(vae, f"VAE of {path}"), meta


def _ebm_entry(path) -> tuple[dict, dict]:
    """(state_dict, metadata) of the energy net at ``path``."""
    from ..loading import _resolve, load_ebm

    net, ck = load_ebm(path, map_location="cpu")
    conf = dict(net.config)
    meta = {"kind": "ebm", "class": "vaebm.models.energy.EnergyNet", "preset": conf.get("preset"),
            "config": conf, "rebuild": "EnergyNet(**config)",
            "source": str(_resolve(path, "ebm.pt")), "source_format": "vaebm",
            "iteration": ck.get("iteration"), "training_config": ck.get("config"),
            "vae_fingerprint": ck.get("vae_fingerprint")}
    return _flat_state_dict(net, f"energy net of {path}"), meta


def _version() -> str:
    from . import _version as v
    return v()


def cmd_export(args) -> int:
    """Write plain state_dict files (torch or safetensors) of a run's VAE and/or energy net."""
    import hashlib
    import io
    import json
    import os

    import torch

    from ..imageio import AtomicFiles

    sources = {k: p for k, p in (("vae", args.vae), ("ebm", args.ebm)) if p}
    if not sources:
        raise UsageError("nothing to export: give --vae and/or --ebm (a run folder or checkpoint)")
    fmt = args.format
    if fmt == "safetensors":
        try:
            import safetensors.torch as st
        except ImportError:
            raise UsageError("--format safetensors needs the safetensors package: "
                             "pip install safetensors (or use --format pt)") from None
    ext = FORMATS[fmt]
    targets = {k: (os.path.join(args.out, f"{k}.{ext}"), os.path.join(args.out, f"{k}.json"))
               for k in sources}
    existing = [p for pair in targets.values() for p in pair if os.path.lexists(p)]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}"
                         "; add --force to replace, or choose another --out")
    entries = {"vae": _vae_entry, "ebm": _ebm_entry}
    done = []
    with AtomicFiles(overwrite=args.force) as files:
        for kind, src in sources.items():
            sd, meta = entries[kind](src)
            weights, sidecar = targets[kind]
            meta = _plain({"format": "vaebm-weights", "version": 1, **meta,
                           "weights": os.path.basename(weights), "weights_format":
                           "safetensors" if fmt == "safetensors" else "torch",
                           "tensors": len(sd), "parameters": sum(v.numel() for v in sd.values()),
                           "vaebm_version": _version()})
            if fmt == "safetensors":
                data = st.save(sd, metadata={"vaebm": json.dumps(meta)})
            else:
                buf = io.BytesIO()
                torch.save(sd, buf)
                data = buf.getvalue()
            meta["sha256"] = hashlib.sha256(data).hexdigest()
            files.write_bytes(weights, data)
            files.write_bytes(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
            done.append(f"{kind}: {meta['tensors']} tensors, {meta['parameters']:,} parameters "
                        f"({meta['class'].rsplit('.', 1)[-1]}, preset {meta['preset']}, "
                        f"iteration {meta['iteration']}) from {meta['source']} -> {weights}, "
                        f"{sidecar}")
    print("\n".join(done), flush=True)
    return 0
