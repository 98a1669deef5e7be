"""Training: stage 1 (the VAE, NVAE-style) and stage 2 (the energy net with the VAE frozen),
checkpoints that resume exactly, data-parallel helpers, configs and logs.

Heavy optional pieces (TensorBoard, tqdm) are imported only when asked for.
"""

from .checkpoint import (CheckpointError, TrainingDiverged, load_checkpoint, load_latest,
                         save_checkpoint)
from .config import (EBM_PRESETS, VAE_PRESETS, EBMConfig, VAEConfig, ebm_config, load_config,
                     parse_overrides, vae_config)
from .distributed import BatchStream, DistInfo, init_distributed
from .ebm import DataError, EBMTrainer, clip_grad_adam_, load_energy, train_ebm
from .interrupt import TrainingInterrupted
from .vae import VAETrainer, bits_per_dim, evaluate_bpd, load_vae_weights, train_vae

__all__ = ["BatchStream", "CheckpointError", "DataError", "DistInfo", "EBMConfig", "EBMTrainer",
           "EBM_PRESETS", "TrainingDiverged", "TrainingInterrupted", "VAEConfig", "VAETrainer",
           "VAE_PRESETS", "bits_per_dim", "clip_grad_adam_", "ebm_config", "evaluate_bpd",
           "init_distributed", "load_checkpoint", "load_config", "load_energy", "load_latest",
           "load_vae_weights", "parse_overrides", "save_checkpoint", "train_ebm", "train_vae",
           "vae_config"]
