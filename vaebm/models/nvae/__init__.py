"""NVAE with a Gaussian decoder (Vahdat & Kautz 2020), the VAE of VAEBM, behind the eps-space
contract of :mod:`vaebm.models.eps_space` and the stage-1 training contract."""

from .model import NVAE
from .summary import count_parameters, describe
from .presets import PAPER_PRESETS, PRESETS, NVAEConfig, get_config

__all__ = ["NVAE", "NVAEConfig", "PRESETS", "PAPER_PRESETS", "count_parameters", "describe",
           "get_config"]

from .official import NVAECheckpointError, load_nvae_checkpoint, nvae_args_to_config  # noqa: E402

__all__ += ["NVAECheckpointError", "load_nvae_checkpoint", "nvae_args_to_config"]
