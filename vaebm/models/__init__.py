"""Networks: the energy nets of Table 7 and their layers (the NVAE backbone comes later)."""

from .energy import PAPER_PRESETS, PRESETS, EnergyNet, count_parameters, describe, energy_ref
from .layers import ResBlock, Swish, WNConv2d, data_init
from .nvae import NVAE

__all__ = ["EnergyNet", "NVAE", "PRESETS", "PAPER_PRESETS", "ResBlock", "Swish", "WNConv2d",
           "count_parameters", "data_init", "describe", "energy_ref"]
