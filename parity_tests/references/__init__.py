"""The references jax_ddpm is compared with: one adapter per reference, one interface.

An adapter (a ``Reference`` subclass) turns a reference implementation into what the
checks compare: NumPy arrays, images NHWC ``[B, H, W, C]``, per-timestep arrays ``[T]``,
and U-Net weights as a flat dict in torch_ref's names (the exchange format of
``jax_ddpm.convert``). The checks (``parity_tests/checks/``) call only these methods, never
a framework or a reference's own API, so each check is written once and runs against every
reference that ``supports`` its component.

A reference that cannot compute a component leaves it out of ``components``: the
oracle has no U-Net, diffusers has no chapter U-Net. ``cases.cases()`` then leaves such
cases out and ``cases.pytest_params()`` marks them skipped; the methods it does not
implement raise ``Unsupported``. A reference whose package is missing (diffusers is an
optional extra) says why in ``unavailable()`` and then supports nothing: its cases are
skipped with that reason in pytest and listed as skipped rows by ``jax-ddpm parity``.

Adding a reference: a module here with a ``Reference`` subclass and an entry in
``REFERENCES``; its name in the case list (``cases.py``) for each component it supports;
a tolerance for each (component, reference) in ``tolerances.py``, with its derivation.

Importing this package imports no framework: the adapters import theirs when first used.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..context import Context
    from ..inputs import Net

#: Every component a check measures (the tolerance table's first key), and what it compares.
COMPONENTS: dict[str, str] = {
    "schedule": "every DiffusionSchedule array [T]",
    "q_sample": "x_t from x_0, t and noise",
    "embedding": "the sinusoidal time embedding (at the argument a float32 program forms)",
    "embedding_exact": "the sinusoidal time embedding at the exact (float64) argument",
    "posterior": "mean and variance of the reverse step from eps",
    "forward": "the U-Net's output, train or eval mode, from the same weights",
    "bn_stats": "BatchNorm running statistics after train-mode forwards",
    "loss": "the eps-MSE loss on one batch (and per training step)",
    "grads": "d loss / d parameter, every parameter",
    "adam_same_grads": "Adam alone: the reference's gradients fed to jax_ddpm's optimizer",
    "adam_step_params": "parameters after Adam steps, each from the reference's state",
    "sgd_update": "the accumulated SGD update, free-running",
    "lr_schedule": "the learning rate of every update over a cosine decay",
    "loss_weights": "the min-SNR-gamma loss weight of every t",
    "weighted_loss": "the min-SNR-weighted loss of given model outputs",
    "sgd_loss": "the SGD run's losses, free-running",
    "sampler": "one reverse step x_i -> x_{i-1} with the U-Net",
    "chain_x0": "a whole sampling chain: the clamped output",
    "chain_trajectory": "a whole sampling chain: every step's state",
    "round_trip": "weights reference -> flax -> reference, bit-exact and loadable",
    # the samplers driven by the analytic denoiser (references/oracle_samplers.py)
    "chain_ddpm": "a ddpm chain (all T steps or respaced), analytic denoiser: trajectory and clamped x_0",
    "chain_ddim": "a ddim chain, analytic denoiser: trajectory and clamped x_0",
    "chain_dpmpp_2m": "a DPM-Solver++(2M) chain, analytic denoiser: trajectory and clamped x_0",
    "chain_chapter": "the chapter's printed loop, analytic denoiser: trajectory and clamped x_0",
    "chain_cosine_eps": "an eps model's chain on the cosine schedule from t = T - 1 (any sampler but chapter)",
}

#: the component of each sampler's analytic-denoiser chain
SAMPLER_CHAIN = {"ddpm": "chain_ddpm", "ddim": "chain_ddim", "dpmpp_2m": "chain_dpmpp_2m", "chapter": "chain_chapter"}


class Unsupported(NotImplementedError):
    """The reference cannot compute this component."""


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """A reference optimizer's Adam state in torch_ref names: step count, first and second moments."""

    count: int                       # steps taken (0: no moments yet)
    mu: dict[str, np.ndarray]        # exp_avg per parameter
    nu: dict[str, np.ndarray]        # exp_avg_sq per parameter
    b2: float                        # the second-moment decay (for the bias correction 1 - b2**count)


class Reference:
    """The interface every adapter implements (what it can: see ``components``).

    ``name`` is the key in ``REFERENCES`` and the tolerance table ('oracle', 'torch', 'diffusers').
    Every method takes the run's ``Context`` where it needs a device or a cache. Models are
    opaque handles: the checks only pass them back to the same adapter.
    """

    name: str = ""
    description: str = ""
    components: frozenset[str] = frozenset()

    def supports(self, component: str) -> bool:
        """Whether this reference can compute ``component`` (a key of ``COMPONENTS``) here:
        nothing while it is ``unavailable``."""
        return component in self.components and not self.unavailable()

    def unavailable(self) -> str | None:
        """None when the reference can run here; else why not, one line (its package is not
        installed). Its cases are then skipped, naming the reason, not failed."""
        return None

    def _unsupported(self, what: str):
        raise Unsupported(f"reference {self.name!r} cannot compute {what}")

    # ------------------------------------------------------------------ closed forms

    def schedule(self, ctx: "Context", kind: str, timesteps: int) -> dict[str, np.ndarray]:
        """Every schedule array, keyed by DiffusionSchedule's field names, [T] each."""
        self._unsupported("schedule")

    def q_sample(self, ctx: "Context", kind: str, timesteps: int, x0: np.ndarray, t: np.ndarray,
                 noise: np.ndarray) -> np.ndarray:
        """x_t [B, H, W, C] for x0, noise [B, H, W, C] and t [B]."""
        self._unsupported("q_sample")

    def embedding(self, ctx: "Context", t: np.ndarray, dim: int, exact_argument: bool = False) -> np.ndarray:
        """The sinusoidal embedding [B, dim] of t [B]; ``exact_argument``: of the float64 ``t * f_k``."""
        self._unsupported("embedding_exact" if exact_argument else "embedding")

    def p_mean_variance(self, ctx: "Context", kind: str, timesteps: int, eps: np.ndarray, x_t: np.ndarray,
                        t: np.ndarray, variance: str, clip: bool) -> tuple[np.ndarray, np.ndarray]:
        """(mean [B, H, W, C], variance [B, 1, 1, 1]) of the reverse step p(x_{t-1} | x_t)."""
        self._unsupported("posterior")

    # ------------------------------------------------------------------ the U-Net

    def unet(self, ctx: "Context", net: "Net", seed: int) -> Any:
        """The U-Net for ``net`` (the chapter's for a ``Net``, UNet2DModel for a ``UNet2DNet``) with the
        reference's default init from ``seed``, train mode."""
        self._unsupported("the U-Net")

    def state_dict(self, model: Any) -> dict[str, np.ndarray]:
        """A copy of every parameter and buffer, in torch_ref names."""
        self._unsupported("state_dict")

    def load_state_dict(self, model: Any, state: Mapping[str, np.ndarray]) -> None:
        """Loads ``state`` strictly (every name, nothing else); raises on a mismatch."""
        self._unsupported("load_state_dict")

    def forward(self, ctx: "Context", model: Any, x: np.ndarray, t: np.ndarray, train: bool) -> np.ndarray:
        """The U-Net's output [B, H, W, C] without gradients; ``train`` updates BatchNorm statistics."""
        self._unsupported("forward")

    def loss_and_grads(self, ctx: "Context", model: Any, kind: str, timesteps: int, x0: np.ndarray, t: np.ndarray,
                       noise: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The eps-MSE loss on x_t = q_sample(x0, t, noise) in train mode, and d loss / d parameter."""
        self._unsupported("loss_and_grads")

    # ------------------------------------------------------------------ training

    def param_names(self, model: Any) -> list[str]:
        """The trainable parameters' names, in the reference's order."""
        self._unsupported("param_names")

    def optimizer(self, model: Any, name: str, lr: float) -> Any:
        """'adam' (the reference's own training setup) or 'sgd' on ``model``'s parameters."""
        self._unsupported(f"optimizer {name}")

    def train_step(self, ctx: "Context", model: Any, opt: Any, kind: str, timesteps: int, x0: np.ndarray,
                   t: np.ndarray, noise: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """One training step with the given t and noise: (loss, this step's gradients)."""
        self._unsupported("train_step")

    def adam_moments(self, model: Any, opt: Any) -> AdamMoments:
        """The optimizer's Adam state (count 0 and empty moments before the first step)."""
        self._unsupported("adam_moments")

    def lr_scheduler(self, opt: Any, schedule: str, decay_steps: int, end_factor: float) -> Any:
        """The reference's scheduler for ``opt`` (``step()`` after each training step); None: constant."""
        self._unsupported(f"lr schedule {schedule}")

    def learning_rates(self, ctx: "Context", lr: float, decay_steps: int, end_factor: float,
                       steps: int) -> np.ndarray:
        """The learning rate of updates 0 .. ``steps`` - 1 [steps] of a cosine decay from ``lr`` to
        ``end_factor * lr`` over ``decay_steps`` updates."""
        self._unsupported("lr_schedule")

    def loss_weights(self, ctx: "Context", kind: str, timesteps: int, gamma: float, prediction: str) -> np.ndarray:
        """The min-SNR-``gamma`` loss weight of each t [T] for a ``prediction`` model, normalised to mean 1."""
        self._unsupported("loss_weights")

    def weighted_loss(self, ctx: "Context", kind: str, timesteps: int, gamma: float, prediction: str,
                      out: np.ndarray, x0: np.ndarray, t: np.ndarray, noise: np.ndarray) -> float:
        """The min-SNR-weighted MSE of the outputs ``out`` against ``prediction``'s target (NHWC)."""
        self._unsupported("weighted_loss")

    # ------------------------------------------------------------------ sampling (eval mode)

    def p_sample(self, ctx: "Context", model: Any, kind: str, timesteps: int, x: np.ndarray, step: int,
                 z: np.ndarray, variance: str, clip: bool) -> np.ndarray:
        """One reverse step x_step -> x_{step-1} [B, H, W, C] with noise z (unused at step 0)."""
        self._unsupported("sampler")

    def sample(self, ctx: "Context", model: Any, sampler: str, kind: str, timesteps: int, x_T: np.ndarray,
               noise: np.ndarray, variance: str, clip: bool,
               prediction: str = "eps") -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """A whole chain from x_T with noise [T, B, H, W, C] (row i added at step i).

        Returns (the clamped x_0, ``{t: the state fed to the U-Net at step t}``).
        ``sampler``: 'ddpm' (``variance``, ``clip``) or 'chapter' (the chapter's loop);
        ``prediction``: what the model's output is read as (eps, x0 or v).
        """
        self._unsupported("chain")

    def sampler_chain(self, ctx: "Context", spec: Any, x_T: np.ndarray,
                      noise: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The chain ``spec`` (an ``oracle_samplers.ChainSpec``) driven by the analytic denoiser, from
        x_T [B, H, W, C] and noise [n, B, H, W, C] (row i: the grid's i-th timestep, ascending).

        Returns (the clamped x_0, ``{t: the state fed to the model at t}``).
        """
        self._unsupported(SAMPLER_CHAIN.get(getattr(spec, "sampler", ""), "sampler chains"))


from .diffusers import DiffusersReference  # noqa: E402  (the adapters subclass Reference)
from .oracle import OracleReference  # noqa: E402
from .torch_ref import TorchRefReference  # noqa: E402

REFERENCES: dict[str, Reference] = {r.name: r for r in (OracleReference(), TorchRefReference(),
                                                         DiffusersReference())}


def get_reference(name: str) -> Reference:
    """The adapter named ``name``; KeyError naming the known ones."""
    try:
        return REFERENCES[name]
    except KeyError:
        raise KeyError(f"no reference {name!r}; known: {', '.join(REFERENCES)}") from None


__all__ = ["AdamMoments", "COMPONENTS", "REFERENCES", "Reference", "SAMPLER_CHAIN", "Unsupported", "get_reference"]
