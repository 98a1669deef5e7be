"""Training configurations: dataclasses, the paper's presets (Table 8 and the NVAE runs behind
them), loading from a TOML file and ``key=value`` overrides.

Stage 2 (:class:`EBMConfig`) presets follow Table 8 of the paper and the published commands
(FACTS sec. 1): ``cifar10``, ``cifar10_persistent``, ``celeba64``, ``lsun_church64``,
``celebahq256``; plus ``fashion_mnist`` (not in the paper) and ``tiny`` (tests).
Stage 1 (:class:`VAEConfig`) presets follow the NVAE runs the VAEBM README lists (FACTS sec. 3).
Batch sizes are GLOBAL (summed over ranks): the paper's 32 per GPU on 8 GPUs is 256.

A TOML config file holds a ``[ebm]`` and/or ``[vae]`` table (or bare keys), each optionally with
``preset = "name"``; the preset is applied first, then the file's keys, then the overrides::

    [ebm]
    preset = "cifar10"
    steps = 20000
    out_dir = "runs/cifar10-ebm"
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.9 / 3.10: the same parser as the tomli package
    import tomli as tomllib


@dataclass
class EBMConfig:
    """Stage 2: train the energy net E(x) with the VAE frozen (paper Sec. 3.1, Appendix E)."""

    preset: str = "custom"
    energy_preset: str = "cifar10"     # EnergyNet preset (Table 7) the CLI builds
    steps: int = 25_000                # training iterations
    batch_size: int = 32               # global batch (all ranks together)
    lr: float = 4e-5                   # constant
    betas: tuple = (0.99, 0.999)
    weight_decay: float = 3e-5         # coupled L2 (torch.optim.Adam's weight_decay)
    alpha_spectral: float = 0.2        # spectral regulariser weight (0.3 CelebA HQ)
    grad_clip: bool = True             # per element to +-(clip_std * sqrt(v_hat) + clip_offset)
    clip_std: float = 3.0
    clip_offset: float = 0.1
    # Langevin in eps-space (negative phase)
    ld_steps: int = 10
    ld_step_size: float = 8e-5
    test_ld_steps: int = 16            # for sampling after training (not used by the trainer)
    energy_mode: str = "paper"         # "paper" (Eq. 9) or "official" (the published code)
    negative: str = "sample"           # "sample" T(eps) or "mean" mu_x(z) fed to E
    chain_negative: str | None = None  # what E sees inside the chain (None: "sample", as published)
    energy_l2: float = 0.0             # + energy_l2 * mean(E(x+)^2 + E(x-)^2) (IGEBM; 0: paper)
    ld_backend: str | None = None      # FusedLangevin backend (None: auto)
    # replay buffer of eps_z (0 disables)
    buffer_size: int = 0
    buffer_prob: float = 0.6
    buffer_ramp: int = 5_000
    buffer_dtype: str = "float32"
    # data
    data_init_batches: int = 5         # batches for the energy net's data-dependent init
    num_workers: int = 0
    check_data_range: bool = True      # batches must lie in [0, 1]
    seed: int = 0
    # output
    out_dir: str | None = None
    ckpt_every: int = 500
    log_every: int = 1
    sample_every: int = 0              # negative grids every n iterations (0: never)
    tensorboard: bool | None = None    # None: when installed
    progress: bool | None = None       # None: on unless vaebm is quiet (VAEBM_QUIET, --quiet)
    # divergence handling
    max_energy_gap: float = 1e4        # |E_pos - E_neg| beyond this is a divergence
    max_grad_norm: float = 1e6
    snapshot_every: int = 100          # in-memory rollback point every n iterations
    on_divergence: str = "lr"          # "lr" (lr *= divergence_lr_factor) or "seed" (new chains)
    divergence_lr_factor: float = 0.5
    max_failures: int = 3
    device: str | None = None


@dataclass
class VAEConfig:
    """Stage 1: train the VAE on -ELBO the NVAE way (FACTS sec. 3)."""

    preset: str = "custom"
    steps: int | None = None           # iterations; or give epochs (needs len(data))
    epochs: float | None = None
    batch_size: int = 32               # global batch
    lr: float = 1e-2
    lr_min: float = 1e-4
    warmup_steps: int | None = None    # linear lr warm-up; or warmup_epochs
    warmup_epochs: float = 5.0
    adamax_eps: float = 1e-3
    weight_decay: float = 3e-4
    kl_anneal_portion: float = 0.3     # KL warm-up over this fraction of the iterations
    kl_const_portion: float = 1e-4     # KL coefficient held at kl_min_coeff first
    kl_min_coeff: float = 1e-4
    kl_balance: bool = True            # NVAE's per-group KL balancing, during warm-up only
    wdn: float = 1e-1                  # spectral + BN regulariser weight ("weight_decay_norm")
    wdn_anneal: bool = False           # log-linear from wdn_init to wdn with the KL coefficient
    wdn_init: float = 10.0
    amp: bool | None = None            # None: on with CUDA (fp16 + GradScaler), off on CPU
    amp_dtype: str | None = None       # None: float16 on CUDA, bfloat16 on CPU
    grad_clip_norm: float | None = None
    num_workers: int = 0
    check_data_range: bool = True
    seed: int = 0
    out_dir: str | None = None
    ckpt_every: int = 1000
    log_every: int = 1
    eval_every: int = 0                # bits/dim on eval data every n iterations (0: at the end)
    eval_iwae_k: int = 100
    eval_batches: int | None = None    # None: the whole eval set
    n_bits: int | None = 8             # bpd correction for [0,1] images of 2**n_bits levels
    sample_every: int = 0
    n_samples: int = 64
    tensorboard: bool | None = None
    progress: bool | None = None       # None: on unless vaebm is quiet (VAEBM_QUIET, --quiet)
    max_grad_norm: float = 1e8
    snapshot_every: int = 100
    divergence_lr_factor: float = 0.5
    max_failures: int = 3
    device: str | None = None


EBM_PRESETS: dict[str, dict] = {
    # Table 8 / published commands. Negatives: x-sample for CIFAR-10, decoder mean elsewhere.
    "cifar10": dict(energy_preset="cifar10", steps=25_000, batch_size=32, lr=4e-5, ld_steps=10,
                    ld_step_size=8e-5, test_ld_steps=16, negative="sample", buffer_size=0),
    "cifar10_persistent": dict(energy_preset="cifar10", steps=25_000, batch_size=32, lr=4e-5,
                               ld_steps=6, ld_step_size=6e-5, test_ld_steps=16,
                               negative="sample", buffer_size=10_000, buffer_ramp=5_000),
    "celeba64": dict(energy_preset="celeba64", steps=20_000, batch_size=32, lr=5e-5, ld_steps=10,
                     ld_step_size=5e-6, test_ld_steps=20, negative="mean", buffer_size=0),
    "lsun_church64": dict(energy_preset="lsun_church64", steps=20_000, batch_size=32, lr=4e-5,
                          ld_steps=10, ld_step_size=4e-6, test_ld_steps=20, negative="mean",
                          buffer_size=10_000, buffer_ramp=5_000),
    "celebahq256": dict(energy_preset="celebahq256", steps=9_000, batch_size=16, lr=4e-5,
                        ld_steps=6, ld_step_size=3e-6, test_ld_steps=24, negative="mean",
                        alpha_spectral=0.3, buffer_size=8_000, buffer_ramp=3_000),
    # not in the paper: CIFAR-10's recipe on the small grayscale net
    "fashion_mnist": dict(energy_preset="fashion_mnist", steps=5_000, batch_size=32, lr=5e-5,
                          ld_steps=10, ld_step_size=8e-5, test_ld_steps=16, negative="sample",
                          buffer_size=0),
    # Fashion-MNIST on a 2-core CPU in ~15-30 minutes (docs/stage2.md has the study behind it):
    # half-width energy net; x-sample chains (as the published CIFAR-10 recipe) with a step
    # large enough to move a weak VAE's samples (3e-3; 8e-5 barely moves them and the energies
    # ran off to -3e4 and diverged); a weak energy L2 (IGEBM's term at 0.01) pins the energies'
    # common offset, which otherwise drifts to -1e3 in 100 iterations, without capping the gap
    # (at 0.1-1, or with decoder means in the chain, the energy stayed bounded but left the
    # samples unchanged: FID 243.6 -> 243.6)
    "fashion_mnist_cpu": dict(energy_preset="mnist_small", steps=200, batch_size=32, lr=5e-5,
                              ld_steps=10, ld_step_size=3e-3, test_ld_steps=16,
                              negative="sample", energy_l2=0.01, buffer_size=0,
                              ckpt_every=50),
    # StackedMNIST on a 2-core CPU: the Fashion-MNIST CPU recipe on 3-channel stacked digits
    "stacked_mnist_cpu": dict(energy_preset="mnist_small", steps=200, batch_size=32, lr=5e-5,
                              ld_steps=10, ld_step_size=3e-3, test_ld_steps=16,
                              negative="sample", energy_l2=0.01, buffer_size=0,
                              ckpt_every=50),
    # tests and smoke runs: seconds on a CPU
    "tiny": dict(energy_preset="tiny", steps=4, batch_size=4, lr=1e-3, ld_steps=2,
                 ld_step_size=1e-2, test_ld_steps=2, buffer_size=16, buffer_ramp=2,
                 data_init_batches=1, ckpt_every=2, snapshot_every=1),
}

VAE_PRESETS: dict[str, dict] = {
    # the NVAE runs behind VAEBM (VAEBM README); batch = 8 GPUs x per-GPU batch
    "cifar10": dict(epochs=400, batch_size=256, lr=1e-2, warmup_epochs=5, wdn=1e-1),
    "celeba64": dict(epochs=50, batch_size=256, lr=1e-2, warmup_epochs=1, wdn=1e-1),
    "lsun_church64": dict(epochs=60, batch_size=256, lr=1e-2, warmup_epochs=1, wdn=1e-1),
    "celebahq256": dict(epochs=200, batch_size=64, lr=6e-3, warmup_epochs=5, wdn=1e-2,
                        wdn_anneal=True, wdn_init=10.0, n_bits=5),
    "fashion_mnist": dict(epochs=100, batch_size=128, lr=1e-2, warmup_epochs=2, wdn=1e-2),
    # the `mnist` NVAE in ~30 minutes of a 2-core CPU (0.65 s per iteration, one thread)
    "fashion_mnist_cpu": dict(steps=2400, batch_size=32, lr=5e-3, warmup_steps=50, wdn=1e-2,
                              eval_iwae_k=10, eval_batches=8, ckpt_every=200),
    "stacked_mnist_cpu": dict(steps=2400, batch_size=32, lr=5e-3, warmup_steps=50, wdn=1e-2,
                              eval_iwae_k=10, eval_batches=8, ckpt_every=200),
    "tiny": dict(steps=6, batch_size=4, lr=1e-3, lr_min=1e-4, warmup_steps=2, wdn=1e-2,
                 eval_iwae_k=4, ckpt_every=3, snapshot_every=1, n_samples=4),
}

_KINDS = {"ebm": (EBMConfig, EBM_PRESETS), "vae": (VAEConfig, VAE_PRESETS)}


def _coerce(cls, name: str, value: Any):
    """Check a field name and convert lists to tuples where the default is a tuple."""
    known = {f.name: f for f in fields(cls)}
    if name not in known:
        close = [k for k in known if k.split("_")[0] == name.split("_")[0]]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown {cls.__name__} field {name!r}{hint}")
    default = known[name].default
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def make_config(kind: str, preset: str | None = None, **overrides):
    """``make_config("ebm", "cifar10", lr=1e-5)`` -> EBMConfig. ``kind`` is "ebm" or "vae"."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'ebm' or 'vae', got {kind!r}")
    cls, presets = _KINDS[kind]
    values: dict = {}
    if preset is not None and preset != "custom":
        if preset not in presets:
            raise ValueError(f"unknown {kind} preset {preset!r}; choose one of "
                             f"{', '.join(presets)}")
        values.update(presets[preset])
        values["preset"] = preset
    for k, v in overrides.items():
        values[k] = _coerce(cls, k, v)
    cfg = cls(**values)
    validate(cfg)
    return cfg


def ebm_config(preset: str | None = None, **overrides) -> EBMConfig:
    return make_config("ebm", preset, **overrides)


def vae_config(preset: str | None = None, **overrides) -> VAEConfig:
    return make_config("vae", preset, **overrides)


def parse_overrides(items: Sequence[str]) -> dict:
    """``["lr=1e-5", "energy_mode=official", "betas=[0.9, 0.999]"]`` -> dict. Values are read as
    TOML (numbers, booleans, strings, arrays); a bare word that is not TOML is taken as a string."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        k, v = k.strip(), v.strip()
        if v.lower() in ("none", "null"):
            out[k] = None
            continue
        try:
            out[k] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k] = v
    return out


def load_config(path, kind: str, overrides: Mapping | Sequence[str] | None = None):
    """Read ``path`` (TOML): the ``[kind]`` table if present, else the top-level keys (other
    tables ignored). ``preset`` there picks the base; ``overrides`` (dict or ``key=value``
    strings) win over the file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML: {e}") from None
    table = data.get(kind)
    if table is None:
        table = {k: v for k, v in data.items() if not isinstance(v, dict)}
    elif not isinstance(table, dict):
        raise ValueError(f"{p}: [{kind}] must be a table")
    table = dict(table)
    if overrides:
        ov = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        table.update(ov)
    preset = table.pop("preset", None)
    try:
        return make_config(kind, preset, **table)
    except KeyError as e:
        raise KeyError(f"{p}: {e.args[0]}") from None


def to_dict(cfg) -> dict:
    """Plain dict (tuples kept) for checkpoints and logs."""
    return dataclasses.asdict(cfg)


def from_dict(kind: str, d: Mapping):
    """Rebuild a config stored by :func:`to_dict` (unknown keys are an error)."""
    cls, _ = _KINDS[kind]
    cfg = cls(**{k: _coerce(cls, k, v) for k, v in d.items()})
    validate(cfg)
    return cfg


def _type_error(cfg, f) -> str | None:
    """Why the value of field ``f`` does not have the field's declared type, or None. Lenient
    where the value can still work (integral floats for integers, paths and devices for
    strings); the point is a message naming the field, e.g. for ``--set lr=abc``."""
    import numbers

    v = getattr(cfg, f.name)
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    names = [a.strip() for a in ann.split("|")]
    if v is None:
        if "None" in names or "Any" in names:
            return None
    else:
        for n in names:
            number = isinstance(v, numbers.Real) and not isinstance(v, bool)
            if n == "int" and number and (isinstance(v, numbers.Integral)
                                          or (math.isfinite(v) and float(v).is_integer())):
                return None
            if n == "float" and number:
                return None
            if n == "bool" and isinstance(v, bool):
                return None
            if n == "str" and not isinstance(v, (bool, numbers.Number, list, tuple, dict)):
                return None
            if n == "tuple" and isinstance(v, (list, tuple)):
                return None
            if n not in ("int", "float", "bool", "str", "tuple", "None"):
                return None  # a type this check does not know: not checked
    words = {"int": "an integer", "float": "a number", "bool": "true or false",
             "str": "a string", "tuple": "an array", "None": "none"}
    want = " or ".join(words.get(n, n) for n in names)
    return (f"{type(cfg).__name__}.{f.name} must be {want}, got {v!r} "
            f"({type(v).__name__})")


def validate(cfg) -> None:
    """Clear errors for values that cannot work."""
    for f in fields(cfg):  # types first: the checks below compare numbers
        msg = _type_error(cfg, f)
        if msg is not None:
            raise ValueError(msg)

    def pos(name, integer=False, allow_zero=False):
        v = getattr(cfg, name)
        ok = v is not None and (v >= 0 if allow_zero else v > 0) and math.isfinite(v)
        if integer:
            ok = ok and int(v) == v
        if not ok:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a "
                             f"{'non-negative' if allow_zero else 'positive'} "
                             f"{'integer' if integer else 'number'}, got {v!r}")

    pos("batch_size", True)
    pos("lr", allow_zero=True)
    pos("weight_decay", allow_zero=True)
    pos("ckpt_every", True, True)
    pos("log_every", True, True)
    pos("max_failures", True, True)
    pos("snapshot_every", True)
    if not 0 < cfg.divergence_lr_factor <= 1:
        raise ValueError(f"divergence_lr_factor must be in (0, 1], got {cfg.divergence_lr_factor}")
    if isinstance(cfg, EBMConfig):
        pos("steps", True, True)
        pos("ld_steps", True, True)
        pos("ld_step_size")
        pos("alpha_spectral", allow_zero=True)
        pos("buffer_size", True, True)
        pos("buffer_ramp", True, True)
        pos("data_init_batches", True, True)
        if cfg.energy_mode not in ("paper", "official"):
            raise ValueError(f"energy_mode must be 'paper' or 'official', got {cfg.energy_mode!r}")
        if cfg.negative not in ("sample", "mean"):
            raise ValueError(f"negative must be 'sample' or 'mean', got {cfg.negative!r}")
        if cfg.chain_negative not in (None, "sample", "mean"):
            raise ValueError("chain_negative must be None, 'sample' or 'mean', "
                             f"got {cfg.chain_negative!r}")
        pos("energy_l2", allow_zero=True)
        if not 0 <= cfg.buffer_prob <= 1:
            raise ValueError(f"buffer_prob must be in [0, 1], got {cfg.buffer_prob}")
        if cfg.on_divergence not in ("lr", "seed"):
            raise ValueError(f"on_divergence must be 'lr' or 'seed', got {cfg.on_divergence!r}")
        if len(cfg.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                          and 0 <= b < 1 for b in cfg.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas!r}")
        if cfg.buffer_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError("EBMConfig.buffer_dtype must be 'float32', 'float16' or 'bfloat16', "
                             f"got {cfg.buffer_dtype!r}")
    else:
        if cfg.steps is None and cfg.epochs is None:
            raise ValueError("VAEConfig needs steps or epochs")
        if cfg.steps is not None:
            pos("steps", True, True)
        if cfg.epochs is not None:
            pos("epochs")
        pos("adamax_eps")
        pos("kl_min_coeff", allow_zero=True)
        pos("eval_iwae_k", True)
        if cfg.eval_batches is not None:
            pos("eval_batches", True)  # None: the whole eval set; 0 would evaluate nothing
        if cfg.n_bits is not None and not (int(cfg.n_bits) == cfg.n_bits and 1 <= cfg.n_bits <= 16):
            raise ValueError(f"VAEConfig.n_bits must be an integer in 1..16 (bits per pixel "
                             f"level) or None, got {cfg.n_bits!r}")
        if not 0 <= cfg.kl_anneal_portion <= 1:
            raise ValueError(f"kl_anneal_portion must be in [0, 1], got {cfg.kl_anneal_portion}")
        if cfg.wdn_anneal and not (cfg.wdn > 0 and cfg.wdn_init > 0):
            raise ValueError("wdn_anneal needs wdn > 0 and wdn_init > 0 (log-linear schedule)")
        if cfg.amp_dtype not in (None, "float16", "bfloat16"):
            raise ValueError("amp_dtype must be None, 'float16' or 'bfloat16', "
                             f"got {cfg.amp_dtype!r}")
