"""The torch_ref adapter (reference name ``torch``): the chapter's PyTorch code, float32.

Everything goes through torch_ref's own functions (``DiffusionProcess``, ``UNet``,
``training.loss_fn`` / ``train_step`` / ``make_optimizer``, ``sampling.p_sample`` /
``sample`` / ``chapter_sample``) on ``ctx.torch_device``; arrays cross as NumPy copies,
images transposed between NHWC (the checks) and NCHW (torch). torch and torch_ref are
imported when first used, so importing this module imports no framework.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from . import AdamMoments, Reference


def _torch():
    import torch

    return torch


def to_torch(ctx, x, nchw: bool = False):
    """A torch copy on ``ctx.torch_device`` with torch's default (contiguous NCHW) strides.

    NumPy keeps odd strides on size-1 axes: a transposed [B, H, W, 1] array looks
    channels_last to torch, oneDNN then keeps the whole U-Net channels_last, and torch's
    CPU BatchNorm2d for channels_last is much less accurate (1.2e-4 vs 5e-7 at 64x64).
    """
    torch = _torch()
    x = np.asarray(x)
    if nchw:
        x = x.transpose(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
    return torch.from_numpy(np.array(x)).clone(memory_format=torch.contiguous_format).to(ctx.torch_device)


def to_np(x, nhwc: bool = False) -> np.ndarray:
    """A copy (``tensor.numpy()`` aliases torch memory that later forwards mutate)."""
    a = x.detach().cpu().numpy().copy() if isinstance(x, _torch().Tensor) else np.array(x)
    return a.transpose(0, 2, 3, 1) if nhwc else a  # [B, C, H, W] -> [B, H, W, C]


def torch_adam_moments(model, opt) -> AdamMoments:
    """A ``torch.optim.Adam``'s state on ``model`` in the model's parameter names."""
    names = {id(p): k for k, p in model.named_parameters()}
    mu, nu, count = {}, {}, 0
    for p, st in opt.state.items():
        if "exp_avg" in st:
            mu[names[id(p)]] = to_np(st["exp_avg"])
            nu[names[id(p)]] = to_np(st["exp_avg_sq"])
            count = int(st["step"])
    return AdamMoments(count, mu, nu, opt.param_groups[0]["betas"][1])


class TorchModuleReference(Reference):
    """What every reference built on a ``torch.nn.Module`` does the same way: gradients by
    parameter name, the optimizer, Adam's moments. Subclasses give ``_adam(model, lr)``."""

    @staticmethod
    def _grads(model) -> dict[str, np.ndarray]:
        return {k: to_np(p.grad) for k, p in model.named_parameters()}

    def param_names(self, model):
        return [k for k, _ in model.named_parameters()]

    def _adam(self, model, lr):
        return _torch().optim.Adam(model.parameters(), lr=lr)

    def optimizer(self, model, name, lr):
        """'adam': ``self._adam`` (torch.optim.Adam's defaults); 'sgd': ``torch.optim.SGD``."""
        if name == "adam":
            return self._adam(model, lr)
        if name == "sgd":
            return _torch().optim.SGD(model.parameters(), lr=lr)
        raise ValueError(f"optimizer must be adam or sgd, got {name!r}")

    def adam_moments(self, model, opt) -> AdamMoments:
        return torch_adam_moments(model, opt)

    def learning_rates(self, ctx, lr, decay_steps, end_factor, steps):
        """The rate of each update as the optimizer reads it (``param_groups[0]['lr']`` before its
        step), ``self.lr_scheduler`` stepped after each; float64, as torch keeps it."""
        torch = _torch()
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = self.lr_scheduler(opt, "cosine", decay_steps, end_factor)
        rates = []
        for _ in range(steps):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return np.asarray(rates, np.float64)


class TorchRefReference(TorchModuleReference):
    """torch_ref as a reference: every component but the float64-only ones."""

    name = "torch"
    description = "torch_ref (the chapter's PyTorch code, corrected), float32"
    components = frozenset({"schedule", "q_sample", "embedding", "forward", "bn_stats", "loss", "grads",
                            "adam_same_grads", "adam_step_params", "sgd_update", "sgd_loss", "lr_schedule", "sampler",
                            "chain_x0", "chain_trajectory", "round_trip", "loss_weights", "weighted_loss"})

    def loss_weights(self, ctx, kind, timesteps, gamma, prediction):
        """torch_ref.training.min_snr_weights on torch_ref's float32 schedule buffers."""
        from torch_ref.training import min_snr_weights

        return to_np(min_snr_weights(self.diffusion(ctx, timesteps, kind), gamma, prediction)).astype(np.float64)

    def weighted_loss(self, ctx, kind, timesteps, gamma, prediction, out, x0, t, noise):
        """torch_ref.training.loss_fn(..., snr_gamma) with a model that returns ``out`` (eps only:
        torch_ref trains eps models)."""
        if prediction != "eps":
            self._unsupported(f"a {prediction} loss (torch_ref trains eps models)")
        from torch_ref.training import loss_fn

        fixed = to_torch(ctx, out, True)
        loss = loss_fn(lambda x_t, tt: fixed, self.diffusion(ctx, timesteps, kind), to_torch(ctx, x0, True),
                       to_torch(ctx, t), to_torch(ctx, noise, True), snr_gamma=gamma)
        return float(loss.item())

    def lr_scheduler(self, opt, schedule, decay_steps, end_factor):
        """torch_ref.training.make_lr_scheduler (``CosineAnnealingLR``)."""
        from torch_ref.training import make_lr_scheduler

        return make_lr_scheduler(opt, schedule, decay_steps, end_factor)

    def diffusion(self, ctx, timesteps: int, kind: str):
        """torch_ref.diffusion.DiffusionProcess(timesteps, kind) on the device, once per context."""
        from torch_ref.diffusion import DiffusionProcess

        return ctx.memo(("torch_ref", "diffusion", timesteps, kind),
                        lambda: DiffusionProcess(timesteps, kind).to(ctx.torch_device))

    # ------------------------------------------------------------------ closed forms

    def schedule(self, ctx, kind, timesteps):
        return {name: to_np(buf) for name, buf in self.diffusion(ctx, timesteps, kind).named_buffers()}

    def q_sample(self, ctx, kind, timesteps, x0, t, noise):
        x_t, _ = self.diffusion(ctx, timesteps, kind)(to_torch(ctx, x0, True), to_torch(ctx, t),
                                                      to_torch(ctx, noise, True))
        return to_np(x_t, nhwc=True)

    def embedding(self, ctx, t, dim, exact_argument=False):
        if exact_argument:
            self._unsupported("embedding_exact")
        from torch_ref.model import SinusoidalPositionEmbeddings

        return to_np(SinusoidalPositionEmbeddings(dim)(to_torch(ctx, t)))

    # ------------------------------------------------------------------ the U-Net

    def unet(self, ctx, net, seed):
        """torch_ref.UNet with torch's default init from ``seed`` (the global RNG is left untouched)."""
        from torch_ref.model import UNet

        torch = _torch()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UNet(net.img_channels, net.time_emb_dim, list(net.features))
        return model.to(ctx.torch_device)

    def state_dict(self, model):
        return {k: to_np(v) for k, v in model.state_dict().items()}

    def load_state_dict(self, model, state: Mapping[str, np.ndarray]) -> None:
        torch = _torch()
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)

    def forward(self, ctx, model, x, t, train):
        model.train(train)
        with _torch().no_grad():
            return to_np(model(to_torch(ctx, x, True), to_torch(ctx, t)), nhwc=True)

    def loss_and_grads(self, ctx, model, kind, timesteps, x0, t, noise):
        from torch_ref.training import loss_fn

        model.train()
        loss = loss_fn(model, self.diffusion(ctx, timesteps, kind), to_torch(ctx, x0, True), to_torch(ctx, t),
                       to_torch(ctx, noise, True))
        model.zero_grad()
        loss.backward()
        return float(loss.item()), self._grads(model)

    # ------------------------------------------------------------------ training

    def _adam(self, model, lr):
        """torch_ref.training.make_optimizer (torch.optim.Adam's defaults)."""
        from torch_ref.training import make_optimizer

        return make_optimizer(model, lr)

    def train_step(self, ctx, model, opt, kind, timesteps, x0, t, noise):
        """torch_ref.training.train_step (train mode, zero_grad, backward, step)."""
        from torch_ref.training import train_step

        loss = train_step(model, self.diffusion(ctx, timesteps, kind), opt, to_torch(ctx, x0, True),
                          to_torch(ctx, t), to_torch(ctx, noise, True))
        return float(loss.item()), self._grads(model)  # this step's gradients

    # ------------------------------------------------------------------ sampling

    def p_sample(self, ctx, model, kind, timesteps, x, step, z, variance, clip):
        from torch_ref.sampling import p_sample

        model.eval()
        return to_np(p_sample(model, self.diffusion(ctx, timesteps, kind), to_torch(ctx, x, True), step,
                              to_torch(ctx, z, True), variance, clip), nhwc=True)

    def sample(self, ctx, model, sampler, kind, timesteps, x_T, noise, variance, clip, prediction="eps"):
        """torch_ref.sample / chapter_sample; a forward pre-hook records every step's U-Net input.
        ``prediction``: the model's output read as eps, x0 or v (torch_ref's X1; the chapter loop: eps)."""
        from torch_ref.sampling import chapter_sample, sample

        torch = _torch()
        model.eval()
        noise_t = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 1, 4, 2, 3))).to(ctx.torch_device)
        diff = self.diffusion(ctx, timesteps, kind)
        traj: dict[int, np.ndarray] = {}
        hook = model.register_forward_pre_hook(
            lambda m, args: traj.__setitem__(int(args[1][0]), to_np(args[0], nhwc=True)))
        try:
            if sampler == "chapter":
                if prediction != "eps":
                    self._unsupported(f"the chapter loop with a {prediction} model")
                x0 = chapter_sample(model, diff, to_torch(ctx, x_T, True), noise_t)
            else:
                x0 = sample(model, diff, to_torch(ctx, x_T, True), noise_t, variance, clip, prediction=prediction)
        finally:
            hook.remove()
        return to_np(x0, nhwc=True), traj


__all__ = ["TorchModuleReference", "TorchRefReference", "to_np", "to_torch", "torch_adam_moments"]
