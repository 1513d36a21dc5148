"""jax_ddpm: a functional JAX/Flax DDPM that mirrors torch_ref, the chapter's PyTorch code."""
from .convert import from_torch_state_dict, load_safetensors, save_safetensors, to_torch_state_dict
from .diffusers_io import (DiffusersFormatError, config_from_diffusers, config_to_diffusers, load_diffusers,
                           save_diffusers)
from .diffusion import eps_mse_loss, p_mean_variance, posterior_mean_variance, predict_x0_from_eps, q_sample
from .models import SinusoidalPositionEmbeddings, TorchBatchNorm, UNet, UNet2DConfig, UNet2DModel
from .sampling import chapter_sample, ddpm_sample, get_sampler, make_sample_fn
from .schedules import DiffusionSchedule, cosine_beta_schedule, linear_beta_schedule, make_schedule
from .training import TrainState, create_train_state, make_optimizer, train_step, train_step_with_noise

__version__ = "0.1.0"

__all__ = [
    "DiffusersFormatError", "DiffusionSchedule", "SinusoidalPositionEmbeddings", "TorchBatchNorm", "TrainState",
    "UNet", "UNet2DConfig", "UNet2DModel", "chapter_sample", "config_from_diffusers", "config_to_diffusers",
    "cosine_beta_schedule", "create_train_state", "ddpm_sample", "eps_mse_loss", "from_torch_state_dict",
    "get_sampler", "linear_beta_schedule", "load_diffusers", "load_safetensors", "make_optimizer",
    "make_sample_fn", "make_schedule", "p_mean_variance", "posterior_mean_variance", "predict_x0_from_eps",
    "q_sample", "save_diffusers", "save_safetensors", "to_torch_state_dict", "train_step",
    "train_step_with_noise",
]
