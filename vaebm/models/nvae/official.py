"""Load NVIDIA's published NVAE checkpoints (the VAEBM backbones) into our NVAE.

The published files are torch pickles written by NVAE's ``train.py``::

    {"epoch": int, "state_dict": OrderedDict, "optimizer": dict, "global_step": int,
     "args": argparse.Namespace, "arch_instance": dict, "scheduler": dict, "grad_scalar": dict}

Loading is safe: ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the only extra
allow-listed global, so no code in the file runs; a file naming any other global is refused
before anything is built. Only regular files are opened; zip records must be stored (as
torch.save writes them), not compressed; the model the ``args`` describe is sized on the meta
device and refused when over :mod:`~vaebm.models.nvae.limits`' limits. The architecture comes from ``args`` (:func:`nvae_args_to_config`), the
weights are mapped onto our modules by name (ours carry the published names):

- ``*.weight_normalized`` entries are dropped: the published ``Conv2D`` without weight norm
  registers its ``weight`` Parameter a second time under that name (same storage);
- our spectral-regulariser buffers ``sr_u``/``sr_v`` have no published counterpart and keep their
  initial (cold) values;
- nothing else is dropped silently: unknown or missing names are an error when ``strict``, and
  are listed in ``info`` (plus a warning) otherwise.

The published ``optimizer``/``scheduler``/``grad_scalar`` states are plain data; they are not
used (sampling and VAEBM training keep the NVAE fixed) and, with zip-format files, are memory
mapped rather than read.
"""

from __future__ import annotations

import argparse
import os
import pickle
import stat
import warnings
import zipfile
from collections.abc import Mapping

import torch

from ..._fileio import file_kind

__all__ = ["NVAECheckpointError", "OFFICIAL_TOP_LEVEL_KEYS", "convert_state_dict",
           "load_nvae_checkpoint", "nvae_args_to_config", "read_nvae_checkpoint"]

OFFICIAL_TOP_LEVEL_KEYS = ("epoch", "state_dict", "optimizer", "global_step", "args",
                           "arch_instance", "scheduler", "grad_scalar")
# the only global beyond torch's weights-only allow-list: train.py pickles its argparse result
_SAFE_GLOBALS = [argparse.Namespace]
# entries every published NVAE state dict has (any architecture)
_SIGNATURE_KEYS = ("prior_ftr0", "stem.weight", "image_conditional.1.weight")
_DUPLICATE_SUFFIX = ".weight_normalized"
# our buffers without a published counterpart (spectral-regulariser power-iteration vectors)
_LOCAL_ONLY_BUFFERS = ("sr_u", "sr_v")
# args fields that decide the architecture (num_x_bits only quantises NVAE's training data) ...
_ARCH_FIELDS = ("dataset", "arch_instance", "num_channels_enc", "num_channels_dec",
                "num_preprocess_blocks", "num_preprocess_cells", "num_postprocess_blocks",
                "num_postprocess_cells", "num_latent_scales", "num_groups_per_scale",
                "num_latent_per_group", "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_nf",
                "use_se", "res_dist", "num_mixture_dec")
# ... and those old files lack, with the defaults VAEBM's loaders patch in
_OLD_DEFAULTS = {"ada_groups": False, "min_groups_per_scale": 1}


class NVAECheckpointError(ValueError):
    """Not a loadable published NVAE checkpoint: corrupt, foreign, unsafe or unsupported."""


# ------------------------------------------------------------------------------------ reading


def read_nvae_checkpoint(path, map_location="cpu") -> dict:
    """Read a published NVAE checkpoint without running any code from it.

    Returns the checkpoint dict (``state_dict``, ``args``, ...). Raises
    :class:`NVAECheckpointError` for a truncated or corrupt file, a file naming Python globals
    outside the allow-list (anything but tensors, plain containers and ``argparse.Namespace``),
    or a pickle that is not an NVAE checkpoint; FileNotFoundError if ``path`` does not exist.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"NVAE checkpoint not found: {path}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader, a device never end
        raise NVAECheckpointError(f"{path}: not a regular file ({_file_kind(st.st_mode)}); "
                                  "checkpoints are read from regular files only")
    if st.st_size == 0:
        raise NVAECheckpointError(f"{path}: empty file, not an NVAE checkpoint")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _check_zip_records(path, st.st_size)
    unsafe = _unsafe_globals(path) if is_zip else []
    if unsafe:
        raise NVAECheckpointError(
            f"{path}: refusing to load, the pickle references Python globals outside the "
            f"allow-list ({', '.join(unsafe)}); unpickling it could run arbitrary code. A "
            "published NVAE checkpoint holds only tensors, plain containers and "
            "argparse.Namespace.")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            # mmap (zip files only): the optimizer state is never paged in
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        # legacy (non-zip) files are not pre-scanned; the weights-only unpickler stops at the
        # first disallowed global or opcode, before calling anything
        raise NVAECheckpointError(
            f"{path}: not loaded, the weights-only unpickler refused it ({_reason(e)}). Either "
            "the file references code outside the allow-list (tensors, plain containers, "
            "argparse.Namespace), which could run when unpickled, or it is not a torch "
            "checkpoint or is corrupt.") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, KeyError) as e:
        raise NVAECheckpointError(
            f"{path}: truncated or corrupt checkpoint file ({type(e).__name__}: {_reason(e)})"
        ) from None
    return _check_structure(ckpt, path)


_file_kind = file_kind


def _check_zip_records(path: str, file_bytes: int) -> None:
    """torch.save writes its zip records uncompressed; a compressed record could expand to any
    size when torch.load reads it, so records must not declare more bytes than the file has."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):  # torch.load reports it with its reason
        return
    declared = sum(i.file_size for i in infos)
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if declared > file_bytes or packed:
        raise NVAECheckpointError(
            f"{path}: refusing to load: its zip records declare {declared:,} bytes in a "
            f"{file_bytes:,}-byte file ({len(packed)} compressed record(s), e.g. {packed[:3]}); "
            "torch.save stores records uncompressed, so this file was crafted or corrupted")


def _unsafe_globals(path: str) -> list[str]:
    """Globals named in a zip-format checkpoint that the weights-only loader would not allow
    (reads the pickle opcodes only; nothing is unpickled)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # corrupt archive: torch.load reports it with a clearer message
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    return [n for n in names if n not in allowed]


_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _reason(e: BaseException) -> str:
    """The informative part of torch's load errors (they wrap it in generic advice)."""
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and not ln.strip().startswith(_BOILERPLATE)]
    text = "; ".join(lines) or type(e).__name__
    # miniz errors continue with a paragraph of advice after the first sentence
    return text.split(". This is an internal miniz error")[0]


def _check_structure(ckpt, path: str) -> dict:
    def fail(msg):
        raise NVAECheckpointError(f"{path}: not an NVAE checkpoint: {msg}")

    if not isinstance(ckpt, Mapping):
        fail(f"the file holds a {type(ckpt).__name__}, expected a dict with keys "
             f"{list(OFFICIAL_TOP_LEVEL_KEYS)}")
    missing = [k for k in ("state_dict", "args") if k not in ckpt]
    if missing:
        fail(f"missing {missing} (found keys {sorted(map(str, ckpt))[:12]}); a published NVAE "
             f"checkpoint has {list(OFFICIAL_TOP_LEVEL_KEYS)}")
    sd, args = ckpt["state_dict"], ckpt["args"]
    if not isinstance(args, argparse.Namespace):
        fail(f"'args' is a {type(args).__name__}, expected the argparse.Namespace of NVAE's "
             "train.py")
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        fail("'state_dict' is not a mapping of tensors")
    absent = [k for k in _SIGNATURE_KEYS if k not in sd]
    if absent:
        fail(f"state_dict lacks {absent} (it holds {len(sd)} entries, e.g. {list(sd)[:5]}); is "
             "this a checkpoint of another model?")
    return dict(ckpt)


# ------------------------------------------------------------------------ args -> architecture


def _arch_args(args) -> dict:
    """The architecture fields of a train.py Namespace (or dict), old files' gaps filled."""
    if isinstance(args, argparse.Namespace):
        a = dict(vars(args))
    elif isinstance(args, Mapping):
        a = dict(args)
    else:
        raise NVAECheckpointError(
            f"NVAE args must be an argparse.Namespace or a dict, got {type(args).__name__}")
    for k, v in _OLD_DEFAULTS.items():
        a.setdefault(k, v)
    missing = [k for k in _ARCH_FIELDS if k not in a]
    if missing:
        raise NVAECheckpointError(f"NVAE args lack the architecture fields {missing}")
    return {k: a[k] for k in _ARCH_FIELDS + tuple(_OLD_DEFAULTS)}


def nvae_args_to_config(args, arch_instance: Mapping | None = None):
    """:class:`~vaebm.models.nvae.NVAEConfig` of the architecture a published ``args`` describes.

    ``args``: the ``argparse.Namespace`` (or dict) NVAE's train.py stored; ``ada_groups`` and
    ``min_groups_per_scale`` default to False and 1 (old files). ``arch_instance``: the stored
    cell recipe dict, checked against ours when given. Image size from ``args.dataset`` as in
    NVAE (cifar10 -> 32, celeba_256 -> 256, ...). Raises :class:`NVAECheckpointError` for what
    our NVAE does not implement: the logistic-mixture decoder (``num_mixture_dec > 1``), the
    Bernoulli decoder of mnist/omniglot, cell recipes other than ``res_mbconv``, a single group.
    """
    from .cells import ARCH_INSTANCES
    from .presets import NVAEConfig, dataset_image_size

    a = _arch_args(args)
    if int(a["num_mixture_dec"]) != 1:
        raise NVAECheckpointError(
            f"unsupported NVAE decoder: num_mixture_dec={a['num_mixture_dec']} is a discretised "
            "logistic mixture; only the Gaussian decoder (num_mixture_dec=1) of the VAEBM "
            "backbones is implemented")
    dataset = str(a["dataset"])
    if dataset in ("mnist", "omniglot"):
        raise NVAECheckpointError(
            f"unsupported NVAE decoder: dataset {dataset!r} uses NVAE's Bernoulli decoder (one "
            "output channel); only Gaussian decoders are implemented")
    name = a["arch_instance"]
    if name not in ARCH_INSTANCES:
        raise NVAECheckpointError(f"unsupported NVAE cell recipe arch_instance={name!r}; "
                                  f"implemented: {sorted(ARCH_INSTANCES)}")
    if arch_instance is not None:
        # the published dict also lists 'ar_nn' (unused by the flows): compare the cells we build
        diff = {k: (list(arch_instance.get(k, [])), v) for k, v in ARCH_INSTANCES[name].items()
                if list(arch_instance.get(k, [])) != list(v)}
        if diff:
            raise NVAECheckpointError(
                f"stored arch_instance differs from the {name!r} recipe for cells {sorted(diff)}: "
                + "; ".join(f"{k}: stored {s}, expected {o}" for k, (s, o) in sorted(diff.items())))
    try:
        return NVAEConfig.from_args(a, image_size=dataset_image_size(dataset), in_channels=3)
    except (ValueError, TypeError) as e:
        raise NVAECheckpointError(f"NVAE args do not describe a buildable model: {e}") from None


# ------------------------------------------------------------------------------------ weights


def convert_state_dict(state_dict: Mapping, model) -> tuple[dict, dict]:
    """Map a published NVAE state dict onto ``model`` (our NVAE).

    The mapping is the identity (our modules carry the published names) except that the
    ``*.weight_normalized`` aliases are dropped after checking they equal ``*.weight``.
    Returns ``(state_dict_for_model, report)``; report keys: ``dropped`` (the aliases),
    ``unexpected`` (published names our model lacks), ``missing`` (our parameters and persistent
    buffers the file lacks, local-only ones excepted), ``local_only`` (our buffers without a
    published counterpart, left at their initial values: ``sr_u``/``sr_v``), ``shape_mismatch``
    (name -> (file shape, model shape)).
    """
    dropped, out = [], {}
    for k, v in state_dict.items():
        base = k[: -len(_DUPLICATE_SUFFIX)] + ".weight"
        if k.endswith(_DUPLICATE_SUFFIX) and base in state_dict:
            w = state_dict[base]
            if w.shape != v.shape or not torch.equal(w, v):
                raise NVAECheckpointError(
                    f"{k} differs from {base}; in a published NVAE checkpoint it is an alias of "
                    "the same parameter, so the file is corrupt or not an NVAE checkpoint")
            dropped.append(k)
            continue
        out[k] = v
    target = model.state_dict()
    absent = [k for k in target if k not in out]
    local_only = sorted(k for k in absent if k.rsplit(".", 1)[-1] in _LOCAL_ONLY_BUFFERS)
    missing = sorted(k for k in absent if k.rsplit(".", 1)[-1] not in _LOCAL_ONLY_BUFFERS)
    unexpected = sorted(k for k in out if k not in target)
    shape_mismatch = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in out.items()
                      if k in target and tuple(v.shape) != tuple(target[k].shape)}
    report = {"dropped": dropped, "unexpected": unexpected, "missing": missing,
              "local_only": local_only, "shape_mismatch": shape_mismatch}
    return {k: v for k, v in out.items() if k in target and k not in shape_mismatch}, report


def load_nvae_checkpoint(path, map_location="cpu", strict: bool = True):
    """Build our NVAE from a published NVAE checkpoint and load its weights.

    Returns ``(model, info)``. ``model``: a :class:`~vaebm.models.nvae.NVAE` in eval mode
    (BatchNorm on running statistics, as VAEBM samples) on the ``map_location`` device (a device
    or its name; a dict or callable is handed to ``torch.load`` and the model follows the
    weights). ``info``: ``path``, ``config``, ``args`` (all stored args, as a dict), ``epoch``,
    ``global_step``, ``arch_instance`` and the report of :func:`convert_state_dict`.

    ``strict``: unknown or missing weights raise :class:`NVAECheckpointError` naming them;
    otherwise the matching weights load and the rest are listed in ``info`` and warned about.
    Shape mismatches always raise (args and weights disagree). Unsafe, truncated or foreign files
    raise :class:`NVAECheckpointError` before any model is built (:func:`read_nvae_checkpoint`),
    and so do args out of range or describing a model larger than the file can hold or than
    ``$VAEBM_MAX_MODEL_BYTES`` allows (:mod:`vaebm.models.nvae.limits`): sizes and weight shapes
    are checked on a meta-device model before the real one is allocated.
    """
    from .limits import check_nvae_config
    from .model import NVAE

    simple = map_location is None or isinstance(map_location, (str, torch.device))
    # tensors stay on the CPU (memory mapped) until the model is built: the optimizer state
    # never reaches the target device
    ckpt = read_nvae_checkpoint(path, map_location="cpu" if simple else map_location)
    path = os.fspath(path)
    arch = ckpt.get("arch_instance")
    config = nvae_args_to_config(ckpt["args"], arch if isinstance(arch, Mapping) else None)
    # nothing real is allocated before the args' size and the weights' shapes are checked: the
    # comparison runs against the model built on the meta device
    meta = check_nvae_config(config, path=path, file_bytes=os.path.getsize(path),
                             error=NVAECheckpointError)
    sd, report = convert_state_dict(ckpt["state_dict"], meta)
    del meta
    bad = report["shape_mismatch"]
    if bad:
        shown = ", ".join(f"{k} file {a} vs model {b}" for k, (a, b) in list(bad.items())[:10])
        raise NVAECheckpointError(
            f"{path}: weights do not fit the architecture its args describe ({_short(config)}): "
            + shown + (" ..." if len(bad) > 10 else ""))
    problems = []
    if report["unexpected"]:
        problems.append(f"{len(report['unexpected'])} unknown weights "
                        f"{_listing(report['unexpected'])}")
    if report["missing"]:
        problems.append(f"{len(report['missing'])} missing weights {_listing(report['missing'])}")
    if problems and strict:
        raise NVAECheckpointError(f"{path}: state_dict does not match the NVAE its args describe: "
                                  + "; ".join(problems) + " (strict=False loads the rest)")
    if problems:
        warnings.warn(f"{path}: loaded with " + "; ".join(problems), stacklevel=2)
    model = NVAE(config)
    model.load_state_dict(sd, strict=False)
    device = (torch.device(map_location if map_location is not None else "cpu") if simple
              else ckpt["state_dict"]["prior_ftr0"].device)
    model = model.to(device).eval()
    info = {"path": path, "config": config, "args": dict(vars(ckpt["args"])),
            "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"),
            "arch_instance": arch, **report}
    return model, info


def _listing(keys, n=8) -> str:
    return str(list(keys[:n]))[:-1] + (", ...]" if len(keys) > n else "]")


def _short(config) -> str:
    return (f"image {config.image_size}, C {config.num_channels_enc}/{config.num_channels_dec}, "
            f"{config.num_latent_scales} scales x {config.num_groups_per_scale} groups, "
            f"Z {config.num_latent_per_group}")
