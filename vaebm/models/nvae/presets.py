"""NVAE configurations: the four VAEBM backbones (FACTS sec. 3, the VAEBM README's NVAE commands)
plus small ``mnist`` and ``tiny`` presets.

Field names are the published ``train.py`` argument names, so :meth:`NVAEConfig.from_args` reads
the ``args`` namespace stored in an official checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class NVAEConfig:
    """Architecture of an :class:`~vaebm.models.nvae.NVAE` with a Gaussian decoder.

    image_size / in_channels: the data's H = W and C. Images whose size is not a multiple of
    2 ** (num_preprocess_blocks + num_latent_scales - 1) are zero-padded (in [0, 1]) to the next
    multiple and the output is cropped back (NVAE pads MNIST 28 -> 32 the same way).
    groups per scale: ``num_groups_per_scale`` at every scale, or halved per coarser scale (not
    below ``min_groups_per_scale``) with ``ada_groups``.
    """

    image_size: int = 32
    in_channels: int = 3
    num_channels_enc: int = 128
    num_channels_dec: int = 128
    num_preprocess_blocks: int = 1
    num_preprocess_cells: int = 2
    num_postprocess_blocks: int = 1
    num_postprocess_cells: int = 2
    num_latent_scales: int = 1
    num_groups_per_scale: int = 30
    num_latent_per_group: int = 20
    num_cell_per_cond_enc: int = 2
    num_cell_per_cond_dec: int = 2
    num_nf: int = 1
    use_se: bool = True
    res_dist: bool = True
    ada_groups: bool = False
    min_groups_per_scale: int = 1
    arch_instance: str = "res_mbconv"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"NVAEConfig.{f.name} must be an int, got {v!r}")
        positive = ["image_size", "in_channels", "num_channels_enc", "num_channels_dec",
                    "num_latent_scales", "num_groups_per_scale", "num_latent_per_group",
                    "num_preprocess_blocks", "num_preprocess_cells", "num_postprocess_blocks",
                    "num_postprocess_cells", "num_cell_per_cond_enc", "min_groups_per_scale"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"NVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_nf", "num_cell_per_cond_dec"):
            if getattr(self, name) < 0:
                raise ValueError(f"NVAEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_latent_scales == 1 and self.num_groups_per_scale == 1:
            raise ValueError("a single latent group (NVAE's 'vanilla VAE') is not supported")
        if self.num_preprocess_blocks != self.num_postprocess_blocks:
            raise ValueError("num_preprocess_blocks must equal num_postprocess_blocks so the "
                             "decoder returns to the input resolution")
        if self.model_size // self.downsample < 1:
            raise ValueError("image too small for this many down-sampling steps")

    @property
    def downsample(self) -> int:
        """Total down-sampling factor from the image to the coarsest latent scale."""
        return 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    @property
    def model_size(self) -> int:
        """H = W the network runs at (image_size rounded up to a multiple of downsample)."""
        d = self.downsample
        return -(-self.image_size // d) * d

    @property
    def groups_per_scale(self) -> list[int]:
        """Groups per scale, index 0 = finest scale (encoder order)."""
        g, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):
            g.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return g

    def replace(self, **kw) -> "NVAEConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_args(cls, args, image_size: int | None = None, in_channels: int | None = None
                  ) -> "NVAEConfig":
        """From the published ``train.py`` namespace (or a dict). The image size comes from
        ``args.dataset`` (cifar10/mnist -> 32, ffhq -> 256, celeba_64 -> 64, ...) unless given.
        Only Gaussian decoders (``num_mixture_dec == 1``) are supported."""
        a = vars(args) if not isinstance(args, dict) else dict(args)
        if int(a.get("num_mixture_dec", 1)) != 1:
            raise ValueError(f"only Gaussian decoders (num_mixture_dec=1) are supported, got "
                             f"num_mixture_dec={a.get('num_mixture_dec')}")
        dataset = str(a.get("dataset", ""))
        if image_size is None:
            image_size = dataset_image_size(dataset)
        if in_channels is None:
            in_channels = 1 if dataset in ("mnist", "omniglot") else 3
        kw = {f.name: a[f.name] for f in dataclasses.fields(cls)
              if f.name in a and f.name not in ("image_size", "in_channels")}
        kw.setdefault("ada_groups", False)
        kw.setdefault("min_groups_per_scale", 1)
        return cls(image_size=image_size, in_channels=in_channels, **kw)


def dataset_image_size(dataset: str) -> int:
    """Image size the published code derives from a dataset name."""
    if dataset in ("mnist", "omniglot", "cifar10", "stacked_mnist"):
        return 32
    if dataset == "ffhq":
        return 256
    if dataset.startswith(("celeba", "imagenet", "lsun")):
        try:
            return int(dataset.split("_")[-1])
        except ValueError:
            pass
    raise ValueError(f"cannot derive the image size from dataset {dataset!r}; pass image_size")


_VAEBM_COMMON = dict(num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1,
                     num_postprocess_cells=2, num_latent_per_group=20, num_cell_per_cond_enc=2,
                     num_cell_per_cond_dec=2, use_se=True, res_dist=True)

PRESETS: dict[str, NVAEConfig] = {
    # the NVAE backbones of VAEBM (VAEBM README "Training NVAE" commands, --num_mixture_dec 1)
    "cifar10": NVAEConfig(image_size=32, num_channels_enc=128, num_channels_dec=128,
                          num_latent_scales=1, num_groups_per_scale=30, num_nf=1, **_VAEBM_COMMON),
    "celeba64": NVAEConfig(image_size=64, num_channels_enc=48, num_channels_dec=48,
                           num_latent_scales=3, num_groups_per_scale=5, num_nf=1, **_VAEBM_COMMON),
    "lsun_church64": NVAEConfig(image_size=64, num_channels_enc=48, num_channels_dec=48,
                                num_latent_scales=3, num_groups_per_scale=5, num_nf=1,
                                **_VAEBM_COMMON),
    "celebahq256": NVAEConfig(image_size=256, num_channels_enc=32, num_channels_dec=32,
                              num_latent_scales=5, num_groups_per_scale=4, num_nf=2,
                              **_VAEBM_COMMON),
    # small: (Fashion-)MNIST 28x28x1, padded to 32; latents at 8x8 and 4x4 (CPU-trainable)
    "mnist": NVAEConfig(image_size=28, in_channels=1, num_channels_enc=16, num_channels_dec=16,
                        num_preprocess_blocks=2, num_preprocess_cells=1, num_postprocess_blocks=2,
                        num_postprocess_cells=1, num_latent_scales=2, num_groups_per_scale=3,
                        num_latent_per_group=8, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
                        num_nf=1),
    # StackedMNIST (Table 5): the mnist preset on 3-channel stacked digits
    "stacked_mnist": NVAEConfig(image_size=28, in_channels=3, num_channels_enc=16,
                                num_channels_dec=16, num_preprocess_blocks=2,
                                num_preprocess_cells=1, num_postprocess_blocks=2,
                                num_postprocess_cells=1, num_latent_scales=2,
                                num_groups_per_scale=3, num_latent_per_group=8,
                                num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_nf=1),
    # for tests: 8x8x3, latents (3, 2, 2) x 2 and (3, 4, 4) x 2, one flow
    "tiny": NVAEConfig(image_size=8, in_channels=3, num_channels_enc=4, num_channels_dec=4,
                       num_preprocess_blocks=1, num_preprocess_cells=1, num_postprocess_blocks=1,
                       num_postprocess_cells=1, num_latent_scales=2, num_groups_per_scale=2,
                       num_latent_per_group=3, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1,
                       num_nf=1),
}

PAPER_PRESETS = ("cifar10", "celeba64", "lsun_church64", "celebahq256")


def get_config(preset: str | NVAEConfig, **overrides) -> NVAEConfig:
    if isinstance(preset, NVAEConfig):
        cfg = preset
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown NVAE preset {preset!r}; known: {sorted(PRESETS)}")
        cfg = PRESETS[preset]
    return cfg.replace(**overrides) if overrides else cfg
