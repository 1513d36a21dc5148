"""Tolerances keyed by (component, reference, dtype, device), each with its derivation.

A tolerance applies to the case's ``metric`` (abs, rel or frac; ``parity_tests/core.py``).
The measured values (CPU, this repository's latest runs in parity_tests/results/, *-r2)
are in the comments. CUDA tolerances are looser where cuDNN/cuBLAS and XLA:GPU pick
different algorithms and reduction orders (Winograd/implicit-GEMM convolutions, split-K,
tree and atomic reductions for the BatchNorm statistics and the weight gradients) -- still
fp32 with TF32 off, so the loss of agreement is a few ulps per reduction, amplified by
BatchNorm's 1/std on small batches and by the chain's 1/sqrt(alpha_t). Elementwise closed
forms (schedules computed on the host, q_sample, the embedding) keep the CPU tolerances:
IEEE fp32 on both devices (an FMA contraction changes at most one rounding; CUDA's
sinf/cosf are within 2 ulp).

The oracle and torch_ref rows are float32 (jax_ddpm's compute dtype); the diffusers rows
(the unet2d architecture) are float32 and float64. A new reference, dtype or device adds its
own entries here, with their derivation: ``tolerance()`` never falls back.
"""
from __future__ import annotations

TOL_DEVICES = ("cpu", "cuda")  # the table's device column (Context.device)

TOLERANCES: dict[tuple[str, str, str, str], float] = {}


def _entry(component: str, references: tuple[str, ...], *, cpu: float, cuda: float, dtype: str = "float32") -> None:
    """Adds (component, reference, dtype, device) -> tol for each reference and both devices."""
    for ref in references:
        for device, tol in (("cpu", cpu), ("cuda", cuda)):
            key = (component, ref, dtype, device)
            if key in TOLERANCES:
                raise ValueError(f"duplicate tolerance {key}")
            TOLERANCES[key] = tol


def tolerance(component: str, reference: str, dtype: str, device: str) -> float:
    """The tolerance for ``component`` against ``reference`` at ``dtype`` on ``device``.

    Raises:
      KeyError: the table has no such combination; the message lists what it has for
        ``component``.
    """
    try:
        return TOLERANCES[(component, reference, dtype, device)]
    except KeyError:
        have = sorted(k[1:] for k in TOLERANCES if k[0] == component)
        raise KeyError(f"no tolerance for component {component!r} vs reference {reference!r}, dtype {dtype}, "
                       f"device {device}; the table has {have or 'nothing'} for it "
                       f"(add one, with its derivation, to parity_tests/tolerances.py)") from None


# ----------------------------------------------------------------------------- closed forms

# schedules: float64 -> float32 once, so <= 2^-24 = 6.0e-8 elementwise vs the oracle;
# measured 5.9e-8 vs oracle, 0 vs torch.
_entry("schedule", ("oracle", "torch"), cpu=1e-7, cuda=1e-7)
# q_sample: |x_t| <= 5, three fp32 roundings: measured <= 2.9e-7 (oracle), 2.4e-7 (torch).
_entry("q_sample", ("oracle", "torch"), cpu=1e-6, cuda=1e-6)
# embedding vs torch / vs the fp32-argument oracle: measured 6.0e-8 / 3.2e-8.
_entry("embedding", ("torch", "oracle"), cpu=1e-6, cuda=1e-6)
# vs exact math: the argument t*f_k rounds in fp32 (torch_ref too): <= T*2^-24*(2+2/e)
# = 1.63e-4 at T = 1000; measured 3.0e-5. Not a jax_ddpm error: torch_ref shows the same.
_entry("embedding_exact", ("oracle",), cpu=1.7e-4, cuda=1.7e-4)
# reverse-step mean and variance vs the float64 oracle, rel to scale; measured <= 1.1e-7.
_entry("posterior", ("oracle",), cpu=1e-6, cuda=1e-6)

# ----------------------------------------------------------------------------- the network

_entry("forward", ("torch",), cpu=1e-5, cuda=1e-4)   # rel to output scale; measured <= 1.7e-6 (train), 3.7e-7 (eval)
_entry("bn_stats", ("torch",), cpu=1e-6, cuda=1e-5)  # per tensor rel; measured <= 8.1e-7 (worst: up1 running_mean)
_entry("loss", ("torch",), cpu=1e-6, cuda=1e-5)      # |a-b|/|b|; measured <= 4.8e-7
# per tensor rel; measured <= 8.6e-6 (chapter width; 7.8e-6 before the strided convolutions'
# custom gradients, parity_tests/results/2026-11-30-cpu-full.* against ...-29-cpu-full-r2.*)
_entry("grads", ("torch",), cpu=1e-4, cuda=1e-3)

# ----------------------------------------------------------------------------- training

# Adam(1e-3), 10 steps. The 1e-5 goal holds for the optimiser alone (torch's gradients
# fed to optax): measured 8.4e-6, of which 6.4e-6 is optax's own rounding -- its moment
# update uses (1 - b2) in float64 while the bias correction 1 - b2**t is float32, and
# float32(0.999) is 1.3e-8 off, i.e. 1.3e-5 relative to 1 - b2; nu_hat is 1.3e-5 high and
# every update 6.4e-6 small (torch does both in float64). Tolerance 2e-5: the per-update
# bound, with room for updates of opposite sign.
_entry("adam_same_grads", ("torch",), cpu=2e-5, cuda=2e-5)
# Adam's parameters after each step started from torch's state: the 1e-5 rel goal holds
# for all but a few elements, and cannot hold for those in fp32. Adam maps a gradient
# component g to about lr*g/(|g|+eps), eps = 1e-8: a component that is ~0 in exact
# arithmetic carries 1e-9..1e-8 of float noise that differs between two correct programs
# (the gradients agree to 1e-5 of each tensor's scale, see the grads rows), and its update
# then differs by up to 2 lr |dg|/(|dg|+eps) -- measured 4e-4 (0.4 lr). So the metric is
# 'frac': the fraction of elements beyond 1e-5 rel (per tensor scale); and every one of
# them must have |torch grad| <= 1e-6 = 100 eps, else the row fails. Measured 1.2e-4
# (30 of 247113 elements, step 1). A wrong lr, b1, b2 or bias correction moves nearly
# every element. Free-running, the shifted elements feed back: params 2e-3 abs, losses
# 5e-4 rel at step 10 (in the notes); SGD, without this amplification, stays tight.
_entry("adam_step_params", ("torch",), cpu=1e-3, cuda=1e-2)
# The learning rate of each update over a cosine decay (4,500 updates), rel to the peak lr:
# jax_ddpm evaluates it in float32 inside the step (optax.cosine_decay_schedule on the int32
# count), the references in float64. The argument pi*i/N rounds to 2^-24 of <= pi (1.9e-7),
# cos to 2^-24 (6e-8), each halved by (1 - f)/2, and the products add 2 ulp: <= 3e-7 of lr.
# Measured on CPU: 1.32e-7 (to 0.1x, vs the oracle and torch), 1.50e-7 (to 0, vs the oracle and diffusers).
_entry("lr_schedule", ("oracle", "torch", "diffusers"), cpu=5e-7, cuda=5e-7)
# min-SNR weights (elementwise rel, every t): SNR = (a / s)^2 from the float32 sqrt(abar) and
# sqrt(1 - abar) (each within 2^-24 = 6e-8 of float64): ratio 1.2e-7, square 2.4e-7, the division
# by SNR or SNR + 1 and the mean over T (one float32 sum, normalised) a few ulp more: <= 1e-6.
# torch_ref computes the same float32 quotient. Measured on CPU: <= 4.2e-7 vs the oracle, 2.4e-7 vs
# torch_ref (the same both devices: T elementwise ops and one sum).
_entry("loss_weights", ("oracle", "torch"), cpu=1e-6, cuda=1e-6)
# diffusers' compute_snr takes 1 - alphas_cumprod in float32: abar_0 = 1 - beta_0 is rounded by
# <= 2^-25 = 3e-8, so 1 - abar_0, and the eps and v weights proportional to it at small t, carry
# <= 3e-8 / beta_0 rel: 3e-4 for the linear schedule's beta_0 = 1e-4 (cosine T = 200: beta_0 =
# 4.7e-4, 6e-5). Measured: 1.66e-4 (linear, eps and v, t = 0), 6.3e-5 (cosine); x0 <= 1.4e-5.
_entry("loss_weights", ("diffusers",), cpu=5e-4, cuda=5e-4)
# The weighted loss of given outputs (|a-b|/|b|): 8 images x 256 squares summed in float32 (a few
# ulp of the mean), the weights as above, the batch mean: <= 2e-6. diffusers' weight error sits at
# the smallest t, whose weights are small (eps/v) or capped (x0). Measured on CPU: <= 3.0e-7 vs the
# oracle, 2.2e-7 vs torch_ref, 4.9e-7 vs diffusers.
_entry("weighted_loss", ("oracle", "torch", "diffusers"), cpu=2e-6, cuda=2e-6)
ADAM_GOAL = 1e-5        # per tensor rel, the goal for parameters after Adam steps
ADAM_GRAD_REL = 1e-4    # gradient noise allowed per tensor (the grads tolerance), relative to max |grad|
# SGD(0.1), 10 steps free-running (the control): the accumulated update p_i - p_0 per
# tensor rel; loss |a-b|/|b|. Measured 1.8e-4 / 3.1e-7.
_entry("sgd_update", ("torch",), cpu=5e-4, cuda=5e-3)
_entry("sgd_loss", ("torch",), cpu=1e-5, cuda=1e-4)

# ----------------------------------------------------------------------------- sampling

# one reverse step, abs (goal 1e-3): measured <= 1.9e-5 (|x| up to 70 at i = 99, cosine's
# beta = 0.999 makes 1/sqrt(alpha) = 31.6).
_entry("sampler", ("torch",), cpu=1e-3, cuda=1e-3)
# whole chain, clamped x_0, abs (goal 1e-3): measured 2.1e-4 (ddpm: the barely trained
# model lets the cosine chain grow to |x| ~ 3e3; 1e-7 of that lands in the few pixels
# that end inside +-1), 8.1e-7 (clip_denoised), 1.2e-6 (linear: 46% clamped), 0
# (chapter_sample: all clamped). CUDA
# 1e-2: its 10x looser forward scales that directly.
_entry("chain_x0", ("torch",), cpu=1e-3, cuda=1e-2)
# whole chain, every step's state rel to its scale: the chain is not chaotic, the
# relative error stays ~1e-6 while |x_t| grows (to 3e3 for the barely trained model,
# 1e33 for chapter_sample, E2); measured <= 2.1e-6 (1000 steps; 100 steps: <= 8.2e-7).
_entry("chain_trajectory", ("torch",), cpu=1e-5, cuda=1e-4)

# ----------------------------------------------------------------------------- weights

_entry("round_trip", ("torch",), cpu=0.0, cuda=0.0)  # exact

# ----------------------------------------------------------------------------- diffusers (unet2d)
#
# Measured on the 2-core CPU (diffusers 0.42.1, torch 2.13.0, jax 0.10.2), full set; the
# rows and configs are cases._diffusers(). diffusers computes its schedule in float32
# (torch.linspace / betas_for_alpha_bar rounded to float32, then a float32 cumprod) where
# jax_ddpm computes in float64 and rounds once; that, not the network, bounds the closed
# forms, the loss and the gradients below.

# schedule (betas, alphas, alphas_cumprod; elementwise rel): linear: float32 linspace is 1 ulp
# off in a third of the betas, the float32 cumprod adds ~T ulps: measured 1.4e-7 (T=20),
# 3.8e-7 (T=1000). cosine: alphas = 1 - fl32(beta) is exact (Sterbenz) but beta near the 0.999
# cap is rounded first: <= ulp(0.999)/2 / (1 - 0.999) = 3e-5 rel; measured 1.3e-5 (T=20 and
# 1000; diffusers.md: 1.3e-5 at t = 999). The same on CUDA (computed on the host).
_entry("schedule", ("diffusers",), cpu=5e-5, cuda=5e-5)
# q_sample = DDPMScheduler.add_noise (abs): diffusers forms 1 - abar in float64 from the
# float32 abar: at t = 0 that cancels, 1 - abar_0 = beta_0 (1e-4 linear, ~4e-5 cosine) carries
# ulp(1)/2 = 3e-8, i.e. <= 7.5e-4 rel, half of it in the sqrt, on a coefficient ~0.01 times
# |noise| <= 4: <= 1.2e-5 abs. Measured 3.3e-6 (linear t=0), 6.2e-6 (cosine t=0), <= 1.3e-6 elsewhere.
_entry("q_sample", ("diffusers",), cpu=3e-5, cuda=3e-5)
# forward, rel to output scale. float32: summation order (convolutions, GroupNorm, attention);
# measured <= 1.2e-6 (eval and train with dropout 0, the three nets); the 1e-5 goal. float64:
# the time embedding's sinusoids are float32 in both (diffusers computes them so for a float64
# model) and XLA's float32 sin/cos differ from torch's by 1 ulp (6e-8) in ~10% of the entries
# (tests/test_unet2d.py: fed the same sinusoids the two float64 networks agree to 1e-15);
# measured 1.4e-9 (cifar10-arch/8), 2.7e-9 (heads), 4.3e-9 (odd-groups), 6.9e-9 (heads, train).
# 2e-8: 3x the worst, as torch's vectorised float32 sin/cos are platform-dependent. A GroupNorm
# eps of 1e-5 for 1e-6 moves the output by ~1e-5 rel: red in float64 by ~1000x, in float32 only
# ~1x (test_can_fail). CUDA: cuDNN/XLA:GPU reduction orders (float32, as for torch_ref); float64:
# the sinusoid floor again (CUDA sinf/cosf within 2 ulp).
_entry("forward", ("diffusers",), cpu=1e-5, cuda=1e-4)
_entry("forward", ("diffusers",), cpu=2e-8, cuda=1e-7, dtype="float64")
# loss (|a-b|/|b|, one batch, and each Adam step's): x_t differs as in the q_sample rows (the
# float32 coefficients, 3.3e-6 abs at t = 0) and jax_ddpm's eps_mse_loss is float32 even for a
# float64 model. Measured float32 <= 4.4e-7 (one batch), 9.8e-7 (Adam steps); float64 <= 2.1e-7.
_entry("loss", ("diffusers",), cpu=5e-6, cuda=2e-5)
_entry("loss", ("diffusers",), cpu=1e-6, cuda=1e-5, dtype="float64")
# gradients of every parameter, per tensor rel (the key biases, whose exact gradient is 0,
# against the largest gradient: measured <= 1.7e-9 float32, 5e-18 float64). The x_t difference
# of the q_sample rows dominates in BOTH dtypes: float32 measured 3.7e-6 (heads), 9.2e-6
# (odd-groups), 1.3e-5 (cifar10-arch/8; worst: GroupNorm affines at 4x4); float64 3.4e-6,
# 1.1e-5, 1.1e-5. Diagnosed on cifar10-arch/8 float64: the same (diffusers') x_t on both sides
# gives 8.8e-8 with jax_ddpm's float32 loss and 4.1e-8 with a float64 one (the float32
# sinusoids, in the time-embedding weights' gradients). So float64 gradient parity is bounded
# by the two libraries' float32 forward-process coefficients, not by the network.
_entry("grads", ("diffusers",), cpu=5e-5, cuda=5e-4)
_entry("grads", ("diffusers",), cpu=5e-5, cuda=5e-4, dtype="float64")
# Adam(1e-3), 10 steps, as for torch_ref. The optimiser alone on diffusers' gradients: measured
# <= 1.5e-6 (optax's float32 bias correction, see adam_same_grads above). Each step from
# diffusers' state: the 'frac' of elements beyond 1e-5 rel, each explained by 1e-4-rel gradient
# noise through Adam's sensitivity; it includes every element of the attention key biases
# (exact gradient 0: Adam turns their rounding noise into updates of up to lr, so their noise
# scale is the largest gradient). Measured 5.2e-4 (87 of 167345, heads; 96 key-bias elements
# in all), 4.3e-4 (odd-groups).
_entry("adam_same_grads", ("diffusers",), cpu=2e-5, cuda=2e-5)
_entry("adam_step_params", ("diffusers",), cpu=2e-3, cuda=1e-2)
# 20-step DDPM chains (DDPMScheduler.step, fixed_small, random-init U-Net, same noise): step()
# recomputes beta_t = 1 - abar_t / abar_{t-1} and 1 - abar_{t-1} in float32 (rel error up to
# ~1e-4 at small t, diffusers.md), which jax_ddpm takes from float64. Clamped x_0 (abs): measured
# 1.1e-6 (cosine clip), 5.8e-6 (linear), 6.5e-6 (linear clip), 3.3e-6 (odd-groups); every
# step's state rel to its scale: <= 6.0e-6.
_entry("chain_x0", ("diffusers",), cpu=1e-4, cuda=1e-3)
_entry("chain_trajectory", ("diffusers",), cpu=5e-5, cuda=5e-4)
_entry("round_trip", ("diffusers",), cpu=0.0, cuda=0.0)  # exact

# ----------------------------------------------------------------------------- samplers (analytic denoiser)
#
# Chains of ddpm (all T or respaced), ddim, dpmpp_2m and chapter driven by the exact posterior
# mean of Gaussian data (references/oracle_samplers.py), cases._samplers(); abs: the largest
# |a - b| over every state fed to the model (unclamped) and the clamped x_0. MEASURED on the
# 2-core CPU over the --full grid (`jax-ddpm parity --full --only " n="`: 437 rows, 186 float32
# and 108 float64 vs the oracle, 143 vs diffusers), by (sampler, schedule, prediction).
#
# vs the float64 oracle, float32. Each step is a few float32 roundings of O(1) numbers; the
# floor no float32 sampler beats is the model output's own rounding (1 ulp of |out| ~ 2e-7),
# carried with gain sqrt(abar_s / abar_t) at a step t -> s: measured by feeding the oracle its
# outputs rounded to float32, 4e-8 .. 3e-7 for the cells of these keys. Measured:
#   ddpm      linear eps 2.6e-6 (the T-step chain, today's code; respaced <= 1.2e-6), x0 1.4e-6,
#             v 9.4e-7; cosine x0 6.1e-7, v 1.0e-6 (eps without t = T-1 in the grid: <= 9e-7)
#   ddim      linear eps 8.5e-7, x0 2.0e-6, v 1.1e-6; cosine x0 1.0e-6, v 1.7e-6
#   dpmpp_2m  linear eps 7.4e-7, x0 1.4e-6, v 7.7e-7; cosine x0 9.6e-7, v 8.5e-7
# so the goal (<= 1e-5 for ddim / DPM-Solver++ chains <= 50 steps) holds with 5x room
# everywhere but chain_cosine_eps below. Tolerance 5e-6 (2x .. 3.5x the worst). Before the
# cancellation-free forms in jax_ddpm.samplers (grids.one_minus_ratio; ddim's 1 - abar_s - sigma^2
# as (1 - abar_s)((1 - eta^2) + eta^2 (1 - q))) these cells measured up to 1.8e-3 (ddpm linear
# T=1000 n=50, t = 940: (1 - abar_t) - (1 - abar_s) cancels where abar ~ 1e-4) and 2.0e-4 (ddim
# eta 1, cosine T=100 n=20).
_entry("chain_ddpm", ("oracle",), cpu=5e-6, cuda=2.5e-5)
_entry("chain_ddim", ("oracle",), cpu=5e-6, cuda=2.5e-5)
_entry("chain_dpmpp_2m", ("oracle",), cpu=5e-6, cuda=2.5e-5)
# chain_cosine_eps: an eps model on the cosine schedule, grid from t = T - 1, sampler ddpm, ddim
# or dpmpp_2m. The capped beta_{T-1} = 0.999 makes abar_{T-1} = 1e-3 abar_{T-2} (2.4e-7 at
# T = 100, 2.4e-9 at T = 1000): x0 = (x - sigma eps) / sqrt(abar) multiplies eps's 1-ulp rounding
# by 1 / sqrt(abar) = 2e3 .. 2e4, and the first step's gain sqrt(abar_s / abar_{T-1}) is 30 .. 500.
# That is the float32 model output, not the sampler: the oracle fed float32-rounded outputs moves by
# 1.4e-5 .. 4.9e-5 (T = 100) and 1.6e-4 .. 2.6e-4 (T = 1000). Measured: ddim 3.5e-5 (T = 100;
# 1.2e-5 at the floor with eta 1 once sigma^2 stopped cancelling), dpmpp_2m 2.5e-4 (T = 1000, at
# its floor 2.4e-4), ddpm 4.6e-4 (T = 1000 linspace, 1.8x its floor 2.6e-4: the mean
# (x - beta / sqrt(1 - abar) eps) / sqrt(alpha) rounds beta / sqrt(1 - abar) once more before the
# same gain). x_0 alone: <= 7.3e-5. No float32 eps model samples this schedule's top step better;
# x0 and v models (the keys above) have no such gain. Tolerance 1e-3 (2.2x the worst).
_entry("chain_cosine_eps", ("oracle",), cpu=1e-3, cuda=4e-3)
# the chapter's loop divides by sqrt(abar_t) at every step (erratum E2) and reaches x0 through eps
# for an x0 or v model: the same 1/sqrt(abar) gain at cosine's top step, in its own arithmetic too
# (x0 -> eps -> x0 cancels: 1.6e-4 where the floor is 1.3e-7). Measured cosine 1.5e-4 (eps),
# 1.6e-4 (x0), 8.6e-5 (v); linear <= 5.4e-7. Tolerance 3e-4.
_entry("chain_chapter", ("oracle",), cpu=3e-4, cuda=1e-3)
# float64 (x64, a float64 schedule and denoiser): the algorithms themselves. Measured <= 7.4e-14
# (ddpm), 1.7e-13 (ddim), 3.6e-15 (dpmpp_2m), 5.1e-13 (chapter), 2.2e-13 (cosine eps): the same
# gains on float64 roundings. 2e-12: a wrong coefficient, grid point or order is >= 1e-4.
for _key in ("chain_ddpm", "chain_ddim", "chain_dpmpp_2m", "chain_cosine_eps", "chain_chapter"):
    _entry(_key, ("oracle",), cpu=2e-12, cuda=2e-11, dtype="float64")
# vs diffusers (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler in float32; only where
# diffusers runs the same chain: cases.diffusers_agrees). diffusers' abar is a float32 cumprod
# (rel 1.3e-5 at cosine's t = T - 1), DDPMScheduler.step recomputes beta_t = 1 - abar_t / abar_prev
# in float32 (rel ~1e-3 at t <= 5, where beta ~ 1e-4: dense grids feel it), DPM-Solver steps
# through float32 sigmas and logs of them. Measured: ddpm 4.7e-5 (linear T=100 n=50; n <= 20:
# <= 6.7e-6), ddim 6.4e-6, dpmpp_2m 1.5e-5 (final sigma_min: diffusers' float32 log of it),
# cosine eps 5.8e-4 (dpmpp_2m T = 1000: diffusers' abar on top of the floor above).
# Tolerances ~2.5x the worst.
_entry("chain_ddpm", ("diffusers",), cpu=1e-4, cuda=4e-4)
_entry("chain_ddim", ("diffusers",), cpu=2e-5, cuda=1e-4)
_entry("chain_dpmpp_2m", ("diffusers",), cpu=4e-5, cuda=2e-4)
_entry("chain_cosine_eps", ("diffusers",), cpu=1.5e-3, cuda=5e-3)

__all__ = ["ADAM_GOAL", "ADAM_GRAD_REL", "TOLERANCES", "TOL_DEVICES", "tolerance"]
