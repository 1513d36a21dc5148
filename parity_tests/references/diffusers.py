"""The diffusers adapter (reference name ``diffusers``): Hugging Face diffusers' own
``UNet2DModel``, ``DDPMScheduler`` and a torch training step, float32 or float64.

What each component runs (diffusers 0.42.1; torch on ``ctx.torch_device``):

- the U-Net: ``diffusers.UNet2DModel(**config)``, ``config`` =
  ``jax_ddpm.diffusers_io.config_to_diffusers(UNet2DConfig(**net.settings))`` without its
  ``_``-keys (so the config mapping is exercised too), torch's default init from a seed, then
  every GroupNorm weight and bias moved by 0.2 N(0, 1) (torch inits them to ones and zeros,
  which would hide a swapped or unmapped affine); ``model.double()`` for a float64 net.
  Weights cross as ``state_dict()`` NumPy copies (diffusers' names: the unet2d weight table).
- forward: ``model(x, t).sample`` (eval, or train mode: dropout is 0 in every case).
- loss: ``F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)``, i.e. the
  forward process is ``DDPMScheduler.add_noise`` (diffusers' float32 ``alphas_cumprod``).
- Adam: ``torch.optim.Adam(model.parameters(), lr)`` with torch's defaults.
- schedule: ``DDPMScheduler(T, beta_schedule='linear' | 'squaredcos_cap_v2')``'s ``betas``,
  ``alphas`` and ``alphas_cumprod`` (what the scheduler holds; float32, as diffusers computes).
- sampler chains on the analytic denoiser (DDPMScheduler, DDIMScheduler,
  DPMSolverMultistepScheduler): ``diffusers_samplers.py``.
- chain: ``DDPMPipeline.__call__``'s loop (``set_timesteps(T)``, then for each t
  ``unet(x, t).sample`` and ``scheduler.step``) from the check's x_T, with
  ``variance_type`` fixed_small (beta_tilde) or fixed_large (beta) and ``clip_sample`` =
  clip_denoised. ``step()`` takes no noise, only a ``generator`` (see ``_ddpm_step``).

torch and diffusers are imported when first used. Without diffusers (an optional extra) the
adapter is ``unavailable()`` and supports nothing: its cases are skipped, naming why.
"""
from __future__ import annotations

import importlib.util
from typing import Mapping

import numpy as np

from .torch_ref import TorchModuleReference, to_np, to_torch

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # jax_ddpm's name -> DDPMScheduler's
VARIANCE_TYPES = {"beta_tilde": "fixed_small", "beta": "fixed_large"}


def _find_spec(name: str):
    """``importlib.util.find_spec`` (imports nothing); a test replaces it to play 'not installed'."""
    return importlib.util.find_spec(name)


def _torch():
    import torch

    return torch


def scheduler(timesteps: int, kind: str, variance: str = "beta_tilde", clip: bool = False):
    """``DDPMScheduler`` for jax_ddpm's schedule ``kind`` (linear 1e-4..0.02 or cosine) and options."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=BETA_SCHEDULES[kind], beta_start=1e-4,
                         beta_end=0.02, variance_type=VARIANCE_TYPES[variance], clip_sample=clip)


def _ddpm_step(sched, eps, t, x, z, generator):
    """``sched.step(eps, t, x)`` with the noise ``z`` instead of the one it draws; checked bit-exact.

    DDPMScheduler.step (0.42.1) has no ``variance_noise`` argument: at t > 0 it adds
    ``_get_variance(t) ** 0.5 * randn_tensor(..., generator)``. So each step is run twice over:
    ``step(..., generator=generator)`` itself, and its last three lines (eq. 7 of Ho et al.:
    the posterior mean of its own ``pred_original_sample``, then the scheduler's own
    ``_get_variance``) written out below with the same operations in the same order. Fed the
    noise ``step`` drew (the generator replayed from its saved state through diffusers'
    ``randn_tensor``), the written-out step must equal ``step``'s ``prev_sample`` bit for bit,
    else this raises; then it is fed ``z``. No monkeypatching; the private attributes used
    (``alphas_cumprod``, ``one``, ``_get_variance``) are guarded by that equality.
    """
    torch = _torch()
    from diffusers.utils.torch_utils import randn_tensor

    state = generator.get_state()
    out = sched.step(eps, t, x, generator=generator)
    prev_t = sched.previous_timestep(t)
    alpha_prod_t = sched.alphas_cumprod[t]
    alpha_prod_t_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    mean = pred_original_sample_coeff * out.pred_original_sample + current_sample_coeff * x
    if t > 0:
        std = sched._get_variance(t) ** 0.5
        replay = torch.Generator(device=generator.device)
        replay.set_state(state)
        drawn = randn_tensor(eps.shape, generator=replay, device=eps.device, dtype=eps.dtype)
        same = torch.equal(mean + std * drawn, out.prev_sample)
        result = mean + std * z
    else:
        same, result = torch.equal(mean + 0, out.prev_sample), mean
    if not same:
        raise AssertionError(f"the written-out DDPMScheduler.step differs from step() at t={int(t)}: "
                             f"diffusers changed step(); update parity_tests/references/diffusers.py")
    return result


class DiffusersReference(TorchModuleReference):
    """diffusers as a reference for the ``unet2d`` architecture and the DDPM scheduler."""

    name = "diffusers"
    description = "Hugging Face diffusers (UNet2DModel, DDPMScheduler, torch Adam), float32 and float64"
    components = frozenset({"schedule", "q_sample", "forward", "loss", "grads", "adam_same_grads",
                            "adam_step_params", "chain_x0", "chain_trajectory", "round_trip",
                            "chain_ddpm", "chain_ddim", "chain_dpmpp_2m", "chain_cosine_eps", "lr_schedule",
                            "loss_weights", "weighted_loss"})

    def _min_snr_weights(self, ctx, kind, timesteps, gamma, prediction):
        """diffusers' training scripts' min-SNR weights (train_text_to_image.py: ``compute_snr``,
        ``torch.stack([snr, gamma]).min``, / SNR for epsilon, / (SNR + 1) for v_prediction; 'sample'
        keeps ``min(SNR, gamma)``) for every t, divided by their mean as jax_ddpm does; float32."""
        torch = _torch()
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler(ctx, kind, timesteps), torch.arange(timesteps))
        w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        w = w / snr if prediction == "eps" else w / (snr + 1) if prediction == "v" else w
        return w / w.mean()

    def loss_weights(self, ctx, kind, timesteps, gamma, prediction):
        return to_np(self._min_snr_weights(ctx, kind, timesteps, gamma, prediction)).astype(np.float64)

    def weighted_loss(self, ctx, kind, timesteps, gamma, prediction, out, x0, t, noise):
        """The scripts' reduction: ``F.mse_loss(reduction='none')`` averaged per image, times the
        weight of its t, averaged; the v target from ``DDPMScheduler.get_velocity``."""
        torch = _torch()
        x0_t, noise_t, t_t = to_torch(ctx, x0, True), to_torch(ctx, noise, True), to_torch(ctx, t)
        target = {"eps": noise_t, "x0": x0_t}.get(prediction)
        if target is None:
            target = self.scheduler(ctx, kind, timesteps).get_velocity(x0_t, noise_t, t_t)
        per_image = torch.nn.functional.mse_loss(to_torch(ctx, out, True), target, reduction="none").mean(dim=(1, 2, 3))
        weights = self._min_snr_weights(ctx, kind, timesteps, gamma, prediction)
        return float((weights[t_t] * per_image).mean().item())

    def lr_scheduler(self, opt, schedule, decay_steps, end_factor):
        """``diffusers.optimization.get_cosine_schedule_with_warmup`` without warm-up (what diffusers'
        training scripts' ``--lr_scheduler cosine`` builds): it decays to 0, so ``end_factor`` 0 only."""
        if schedule == "constant":
            return None
        if schedule != "cosine" or end_factor != 0:
            self._unsupported(f"a {schedule} lr schedule ending at {end_factor} x lr")
        from diffusers.optimization import get_cosine_schedule_with_warmup

        return get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=decay_steps)

    def unavailable(self) -> str | None:
        missing = [n for n in ("torch", "diffusers") if _find_spec(n) is None]
        return f"{' and '.join(missing)} not installed (pip install 'jax-ddpm[diffusers]')" if missing else None

    def scheduler(self, ctx, kind: str, timesteps: int):
        """The training-time scheduler (its betas and ``add_noise``), once per context."""
        return ctx.memo(("diffusers", "scheduler", timesteps, kind), lambda: scheduler(timesteps, kind))

    # ------------------------------------------------------------------ closed forms

    def schedule(self, ctx, kind, timesteps):
        s = self.scheduler(ctx, kind, timesteps)
        return {"betas": to_np(s.betas), "alphas": to_np(s.alphas), "alphas_cumprod": to_np(s.alphas_cumprod)}

    def q_sample(self, ctx, kind, timesteps, x0, t, noise):
        x_t = self.scheduler(ctx, kind, timesteps).add_noise(to_torch(ctx, x0, True), to_torch(ctx, noise, True),
                                                             to_torch(ctx, t))
        return to_np(x_t, nhwc=True)

    # ------------------------------------------------------------------ the U-Net

    def unet(self, ctx, net, seed):
        """UNet2DModel for ``net`` (a UNet2DNet), torch's init from ``seed``, GroupNorm affines perturbed."""
        torch = _torch()
        from diffusers import UNet2DModel

        from jax_ddpm.diffusers_io import config_to_diffusers
        from jax_ddpm.models.unet2d import UNet2DConfig

        config = {k: v for k, v in config_to_diffusers(UNet2DConfig(**dict(net.settings))).items()
                  if not k.startswith("_")}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UNet2DModel(**config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(0.2 * torch.randn_like(p))
        if getattr(net, "dtype", "float32") == "float64":
            model = model.double()
        return model.to(ctx.torch_device)

    def state_dict(self, model):
        return {k: to_np(v) for k, v in model.state_dict().items()}

    def load_state_dict(self, model, state: Mapping[str, np.ndarray]) -> None:
        torch = _torch()
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)

    @staticmethod
    def _input(ctx, model, x, nchw: bool = True):
        return to_torch(ctx, x, nchw).to(model.dtype)

    def forward(self, ctx, model, x, t, train):
        model.train(train)
        with _torch().no_grad():
            return to_np(model(self._input(ctx, model, x), to_torch(ctx, t)).sample, nhwc=True)

    def _loss(self, ctx, model, kind, timesteps, x0, t, noise):
        """eps-MSE on ``add_noise(x0, noise, t)`` in train mode (the model's dtype throughout)."""
        import torch.nn.functional as F

        model.train()
        noise_t, t_t = self._input(ctx, model, noise), to_torch(ctx, t)
        x_t = self.scheduler(ctx, kind, timesteps).add_noise(self._input(ctx, model, x0), noise_t, t_t)
        return F.mse_loss(model(x_t, t_t).sample, noise_t)

    def loss_and_grads(self, ctx, model, kind, timesteps, x0, t, noise):
        loss = self._loss(ctx, model, kind, timesteps, x0, t, noise)
        model.zero_grad()
        loss.backward()
        return float(loss.item()), self._grads(model)

    # ------------------------------------------------------------------ training
    # (gradients by name, the optimizer and Adam's moments: TorchModuleReference)

    def train_step(self, ctx, model, opt, kind, timesteps, x0, t, noise):
        """zero_grad, the eps-MSE loss on add_noise, backward, step: (loss, this step's gradients)."""
        opt.zero_grad()
        loss = self._loss(ctx, model, kind, timesteps, x0, t, noise)
        loss.backward()
        opt.step()
        return float(loss.item()), self._grads(model)

    # ------------------------------------------------------------------ sampling

    def sample(self, ctx, model, sampler, kind, timesteps, x_T, noise, variance, clip, prediction="eps"):
        """DDPMPipeline's loop from x_T, the check's noise row t added at step t (``_ddpm_step``).

        Returns ``x.clamp(-1, 1)`` (the pipeline's last line is the same clamp written for
        [0, 1] images, ``(x / 2 + 0.5).clamp(0, 1)``) and every step's U-Net input.
        """
        if sampler != "ddpm":
            self._unsupported(f"the {sampler!r} sampler")
        if prediction != "eps":
            self._unsupported(f"a {prediction} model in this chain (the analytic-denoiser rows compare those)")
        torch = _torch()
        sched = scheduler(timesteps, kind, variance, clip)
        sched.set_timesteps(timesteps)
        model.eval()
        x = self._input(ctx, model, x_T)
        z = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 1, 4, 2, 3))).to(ctx.torch_device, model.dtype)
        generator = torch.Generator(device="cpu").manual_seed(0)  # only for step()'s own draw (replayed)
        traj: dict[int, np.ndarray] = {}
        with torch.no_grad():
            for t in sched.timesteps:
                traj[int(t)] = to_np(x, nhwc=True)
                eps = model(x, t).sample
                x = _ddpm_step(sched, eps, t, x, z[int(t)], generator)
        return to_np(x.clamp(-1, 1), nhwc=True), traj


    def sampler_chain(self, ctx, spec, x_T, noise):
        """DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler on the analytic denoiser
        (``diffusers_samplers.run_chain``); diffusers has no chapter loop."""
        if spec.sampler == "chapter":
            self._unsupported("chain_chapter")
        from .diffusers_samplers import run_chain

        return run_chain(ctx, spec, x_T, noise)


__all__ = ["BETA_SCHEDULES", "DiffusersReference", "VARIANCE_TYPES", "scheduler"]
