"""What ``jax-ddpm train`` draws beside the training: the sample grids, the loss plot's pace and
the quality rows of ``--eval-every`` (with quality.png).

None of it changes the training: every sample is drawn from the EMA weights of the state as it
is, with keys of its own (the grids' ``run_keys(seed)["sample"]``, the evaluations'
``jax.random.key(seed)`` as ``jax-ddpm sample --seed`` draws them), never the training key,
so a run with grids or evaluations ends with the same bits as one without
(``tests/test_train_eval.py``).

Quality during training (``--eval-every N``, ``--eval-num M``; docs/quality.md): at every step
that is a multiple of N, and at the last step (``--steps``), process 0 draws M samples exactly
as ``jax-ddpm eval --checkpoint-step STEP --num M --seed SEED`` would with the grids' sampler
settings (``--sample-sampler`` and its options, ``--bn-stats``, the run's variance and clipping;
``app.sample.draw_samples``), scores them with ``app.eval.score`` (the cached digits
classifier: FID beside its real-vs-real floor, confident share, classes) and appends one line
``{"step": STEP, "kind": "eval", ...}`` to metrics.jsonl (loss lines have no ``kind``); then
quality.png is redrawn from every quality line of the run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ..images import save_quality_plot
from ..sampling import make_sample_fn
from ..training import TrainState
from .config import SampleConfig, TrainConfig, grid_sampler_settings
from .console import NonFiniteError, Progress, warning
from .devices import local_copy
from .factories import build_model, image_shape
from .workdir import EVAL_KIND, LoadedRun, RunFiles, append_metrics

PLOT_EVERY_S = 30.0  # loss.png is redrawn at a checkpoint at most this often (and always at the end)


# ----------------------------------------------------------------------------- sample grids
def sample_grid_record(config: TrainConfig, sampling: Mapping[str, Any]) -> dict[str, Any]:
    """How the sample grids are drawn, as config.json and the checkpoint metadata record it
    (``sample_grid``): ``sampler``, ``num_steps`` (None: all T) and the sampler's options as
    given or taken from the run's ``sampling``. Folders written before it drew them with ddpm
    over all T steps. A record, not part of the identity: ``--sample-*`` may change on resume."""
    settings = grid_sampler_settings(config, sampling)
    return {"sampler": config.sample_sampler, "num_steps": settings.pop("num_steps", None), **settings}


def sample_grid_fn(config: TrainConfig, keys: Mapping[str, jax.Array],
                   sampling: Mapping[str, Any]) -> Callable[[TrainState], np.ndarray]:
    """``grid(state) -> [N, H, W, C]`` samples from fixed x_T and noise (EMA weights, the
    ``--sample-sampler`` and its options, default ddpm over all T steps, with the run's sampling
    settings: clipped x0 and the posterior variance unless imported otherwise), on one device
    (``local_copy``), not the whole mesh; compiled at its first call."""
    sample = make_sample_fn(build_model(config), config.sample_sampler, bn_stats=config.bn_stats,
                            prediction=config.diffusion.prediction, **grid_sampler_settings(config, sampling))
    x_T = jax.random.normal(jax.random.fold_in(keys["sample"], 0), (config.num_samples,) + image_shape(config))
    noise_key = jax.random.fold_in(keys["sample"], 1)

    def grid(state: TrainState) -> np.ndarray:
        state = local_copy(state)
        samples = np.asarray(jax.device_get(sample(state.ema_variables, state.schedule, x_T, noise_key)))
        if not np.isfinite(samples).all():
            raise NonFiniteError(f"the sample grid of step {int(jax.device_get(state.step))} is not finite (NaN/inf); "
                                 "nothing written")
        return samples

    return grid


# ----------------------------------------------------------------------------- quality during training
def eval_due(config: TrainConfig, step: int) -> bool:
    """Whether ``--eval-every`` scores ``step``: a multiple of it, or the last step (``--steps``)."""
    return bool(config.eval_every) and step > 0 and (step % config.eval_every == 0 or step == config.steps)


def eval_owed(config: TrainConfig, step: int, rows: list[dict]) -> bool:
    """Whether the step a run starts from (a resume, or a finished run) should be scored now: it is
    due (:func:`eval_due`) and has no quality line (the run stopped on a signal there, or was
    killed while scoring it, or ran without ``--eval-every``)."""
    return eval_due(config, step) and not any(r["step"] == step for r in rows)


@dataclass(frozen=True, eq=False)
class QualityEvaluator:
    """Scores the EMA weights of a train state (see the module docstring). ``reference``: the
    digits' ``quality.Reference`` (loaded once, from the cache when there)."""

    config: TrainConfig
    sampling: Mapping[str, Any]  # the run's variance and clipping (checkpoint metadata ``sampling``)
    reference: Any

    @classmethod
    def load(cls, config: TrainConfig, sampling: Mapping[str, Any],
             say: Callable[[str], None] | None = None) -> "QualityEvaluator":
        """Loads (or trains, a few seconds, and caches: said through ``say``) the classifier. Raises
        ConfigError for data without a feature extractor (``checks.quality_data``)."""
        from .checks import quality_data
        from .eval import load_reference

        reference, _ = load_reference(quality_data("--eval-every", config.data.source), config.model.image_size,
                                      say=say)
        return cls(config, dict(sampling), reference)

    def sample_config(self) -> SampleConfig:
        """What ``jax-ddpm eval`` (and ``sample``) would be given to draw the same samples."""
        c = self.config
        return SampleConfig(workdir=c.workdir, out="", num=c.eval_num, seed=c.seed, sampler=c.sample_sampler,
                            bn_stats=c.bn_stats, num_steps=c.sample_num_steps, eta=c.sample_eta,
                            timestep_spacing=c.sample_timestep_spacing, steps_offset=c.sample_steps_offset)

    def __call__(self, state: TrainState, step: int) -> dict:
        """The metrics.jsonl line of ``state`` at ``step``. Raises NonFiniteError (NaN/inf samples)."""
        from .eval import sampling_record, score
        from .sample import draw_samples, sampler_options

        c, sc = self.config, self.sample_config()
        run = LoadedRun(config=c, step=step, state=local_copy(state), meta={"sampling": dict(self.sampling)})
        options = sampler_options(sc, run.sampling, c.diffusion.timesteps, c.diffusion.prediction)
        t0 = time.perf_counter()
        try:
            samples = draw_samples(sc, run)
        except NonFiniteError as e:
            raise NonFiniteError(f"--eval-every: the quality samples of step {step} are not finite ({e})") from None
        t1 = time.perf_counter()
        metrics = score(samples, self.reference, c.seed)
        sampling = {k: v for k, v in sampling_record(sc, run, options).items() if k != "checkpoint_step"}
        return {"step": step, "kind": EVAL_KIND, **metrics, "sampling": sampling, "time": round(time.time(), 3),
                "wall_s": {"sampling": round(t1 - t0, 3), "metrics": round(time.perf_counter() - t1, 3)}}


def record_evaluation(evaluator: QualityEvaluator, files: RunFiles, rows: list[dict], state: TrainState, step: int,
                      progress: Progress) -> dict:
    """Scores ``state``, appends its line to metrics.jsonl and to ``rows`` (the run's quality
    lines), redraws quality.png from ``rows`` and says the numbers in one line."""
    from .eval import metrics_summary

    row = evaluator(state, step)
    append_metrics(files.metrics, row)
    rows.append(row)
    save_quality_plot(files.quality_plot, rows)
    wall = row["wall_s"]["sampling"] + row["wall_s"]["metrics"]
    progress.message(f"step {step}: {metrics_summary(row)} | {row['num_samples']} samples in {wall:.1f}s")
    if not row["classifier_ok"]:
        warning(f"the classifier's held-out accuracy is {row['classifier_accuracy']:.1%}: the quality numbers are "
                "not meaningful")
    return row


__all__ = ["PLOT_EVERY_S", "QualityEvaluator", "eval_due", "eval_owed", "record_evaluation", "sample_grid_fn",
           "sample_grid_record"]
