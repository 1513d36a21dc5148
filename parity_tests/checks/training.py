"""Checks of training: the loss and every gradient on one batch, Adam and SGD steps."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm import training

from .. import jax_side
from ..context import Context
from ..core import Measure, fmt, per_tensor, worst_over_steps
from ..inputs import Net, cast, digits, normal, rng, timesteps as draw_timesteps
from ..references import Reference
from ..tolerances import ADAM_GOAL, ADAM_GRAD_REL
from .forward import bn_names, counts_equal


def _loss_and_grads(ctx: Context, ref: Reference, net: Net, kind: str, timesteps: int):
    """(reference loss, reference grads, jax loss, jax grads in torch_ref names) on one batch, cached."""

    def build():
        gen = rng("loss", net, kind, timesteps)
        x0 = gen.uniform(-1, 1, (net.batch, net.size, net.size, net.img_channels)).astype(np.float32)
        noise = normal(gen, x0.shape)
        t = draw_timesteps(gen, net.batch, timesteps)
        x0, noise = cast(x0, net), cast(noise, net)
        model = ref.unet(ctx, net, seed=3)
        variables = jax_side.variables(ref.state_dict(model), net)
        loss, ref_grads = ref.loss_and_grads(ctx, model, kind, timesteps, x0, t, noise)
        fns = jax_side.fns(ctx, net)
        (jloss, _), grads = fns.loss_and_grad(variables["params"], variables.get("batch_stats"),
                                              jax_side.schedule(ctx, timesteps, kind), jnp.asarray(x0),
                                              jnp.asarray(t, jnp.int32), jnp.asarray(noise))
        # grads have the params' tree, so convert's table (incl. the conv-transpose flip) applies
        jax_grads = jax_side.state_dict(training.model_variables(grads, variables.get("batch_stats")), net)
        return loss, ref_grads, float(jloss), jax_grads

    return ctx.memo(("loss_and_grads", ref.name, net, kind, timesteps), build)


def check_loss(ctx: Context, ref: Reference, net: Net, kind: str, timesteps: int) -> Measure:
    """eps-MSE loss on the same x0, t and noise; rel = |a - b| / |b|."""
    tl, _, jl, _ = _loss_and_grads(ctx, ref, net, kind, timesteps)
    return Measure(abs(jl - tl), abs(jl - tl) / abs(tl), f"loss {tl:.5f}")


def check_grads(ctx: Context, ref: Reference, net: Net, kind: str, timesteps: int) -> Measure:
    """d loss / d parameter for every parameter, per tensor rel (max over tensors).

    A parameter whose exact gradient is 0 (``jax_side.zero_gradient_params``: the attention's
    key bias) has only rounding noise on both sides: its rel is max(|ours|, |theirs|) over the
    largest gradient of any tensor, so it must be ~0 on both sides, not agree in its noise.
    """
    _, tg, _, jg = _loss_and_grads(ctx, ref, net, kind, timesteps)
    zero = jax_side.zero_gradient_params(net)
    m = per_tensor(jg, tg, [k for k in sorted(tg) if k not in zero])
    if not zero:
        return m
    scale = max(float(np.abs(g).max()) for g in tg.values())
    z_abs = max(float(np.abs(jg[k].astype(np.float64) - tg[k]).max()) for k in zero)
    z_rel = max(max(float(np.abs(jg[k]).max()), float(np.abs(tg[k]).max())) for k in zero) / scale
    return dataclasses.replace(m, abs_err=max(m.abs_err, z_abs), rel_err=max(m.rel_err, z_rel),
                               note=f"{m.note}; {len(zero)} key biases (exact gradient 0): |grad| <= "
                                    f"{fmt(z_rel)} of the largest")


def _state_from_reference(ref: Reference, model: Any, opt: Any, template: training.TrainState,
                          net: Net) -> training.TrainState:
    """The reference's parameters, BN buffers and Adam moments (mu, nu, count) as a JAX TrainState.

    ``template`` gives the static fields and, before the reference's first step, the zero moments.
    """
    import optax

    buffers = ref.state_dict(model)
    variables = jax_side.variables(buffers, net)
    moments = ref.adam_moments(model, opt)
    opt_state = template.opt_state  # the initial (zero) moments before the first step
    if moments.count:
        count = jnp.asarray(moments.count, jnp.int32)

        def at_reference(s):  # Adam's moments and count; a learning-rate schedule's count
            if isinstance(s, optax.ScaleByAdamState):
                return s._replace(count=count, mu=jax_side.variables({**buffers, **moments.mu}, net)["params"],
                                  nu=jax_side.variables({**buffers, **moments.nu}, net)["params"])
            return s._replace(count=count) if isinstance(s, optax.ScaleByScheduleState) else s

        opt_state = jax.tree_util.tree_map(at_reference, opt_state, is_leaf=lambda s: isinstance(
            s, (optax.ScaleByAdamState, optax.ScaleByScheduleState)))
    return template.replace(step=jnp.asarray(moments.count, jnp.int32), params=variables["params"],
                            batch_stats=variables.get("batch_stats"), opt_state=opt_state)


NO_LR_SCHEDULE = ("constant", 0, 0.0)


def _make_optimizer(lr: float, lr_schedule: tuple[str, int, float]):
    """jax_ddpm's Adam at ``lr`` with ``lr_schedule`` = (schedule, decay steps, end factor)."""
    schedule, decay_steps, end_factor = lr_schedule
    return training.make_optimizer(lr, schedule=schedule, decay_steps=decay_steps, end_factor=end_factor)


def _train_run(ctx: Context, ref: Reference, net: Net, optimizer: str, steps: int, kind: str, timesteps: int,
               lr: float, lr_schedule: tuple[str, int, float] = NO_LR_SCHEDULE):
    """``steps`` training steps on both sides on the same batches, t and noise.

    The reference: its ``train_step`` with its Adam (``optimizer('adam')``) or SGD(lr), and
    (Adam) its scheduler for ``lr_schedule`` stepped after each step; JAX:
    ``jax_ddpm.training.train_step_with_noise`` with ``make_optimizer(lr, schedule=...)`` (Adam)
    or ``optax.sgd(lr)``, run two ways: free-running from the same initial state, and (Adam)
    each step started from the reference's current state -- parameters, BN buffers and Adam
    moments -- so that one step's disagreement is measured without the earlier steps' feeding back.
    """

    def build():
        import optax

        gen = rng("train", net, optimizer, steps, kind, timesteps, lr)
        model = ref.unet(ctx, net, seed=4)
        init = ref.state_dict(model)
        variables = jax_side.variables(init, net)
        opt = ref.optimizer(model, optimizer, lr)
        sched = ref.lr_scheduler(opt, *lr_schedule) if lr_schedule != NO_LR_SCHEDULE else None
        tx = _make_optimizer(lr, lr_schedule) if optimizer == "adam" else optax.sgd(lr)
        fns = jax_side.fns(ctx, net)
        state = jax_side.train_state(fns, variables, tx, jax_side.schedule(ctx, timesteps, kind))
        data = (digits(net.size, net.batch * steps, seed=0) if net.img_channels == 1 else
                gen.uniform(-1, 1, (net.batch * steps, net.size, net.size, net.img_channels)).astype(np.float32))
        run = SimpleNamespace(init=init, param_names=ref.param_names(model), zero=jax_side.zero_gradient_params(net),
                              ref_losses=[], ref_states=[], ref_grads=[], ref_sqrt_vhat=[],
                              free_losses=[], free_states=[], forced_losses=[], forced_states=[])
        for i in range(steps):
            x0 = data[i * net.batch:(i + 1) * net.batch]
            t = gen.integers(0, timesteps, net.batch)
            noise = normal(gen, x0.shape)
            args = (jnp.asarray(x0), jnp.asarray(t, jnp.int32), jnp.asarray(noise))
            if optimizer == "adam":
                forced, metrics = fns.train_step(_state_from_reference(ref, model, opt, state, net), *args)
                run.forced_losses.append(float(metrics["loss"]))
                run.forced_states.append(jax_side.state_dict(forced.variables, net))
            loss, grads = ref.train_step(ctx, model, opt, kind, timesteps, x0, t, noise)
            if sched is not None:
                sched.step()
            state, metrics = fns.train_step(state, *args)
            run.ref_losses.append(loss)
            run.ref_states.append(ref.state_dict(model))
            run.ref_grads.append(grads)  # this step's gradients
            if optimizer == "adam":  # Adam's denominator sqrt(v_hat) after this step
                m = ref.adam_moments(model, opt)
                run.ref_sqrt_vhat.append({k: np.sqrt(m.nu[k] / (1 - m.b2 ** m.count)) for k in run.param_names})
            run.free_losses.append(float(metrics["loss"]))
            run.free_states.append(jax_side.state_dict(state.variables, net))
        return run

    return ctx.memo(("train_run", ref.name, net, optimizer, steps, kind, timesteps, lr, lr_schedule), build)


def _adam_params_step(run: SimpleNamespace, i: int, ref_state: dict, ours: dict, lr: float) -> Measure:
    """Step i's parameters (per tensor rel) and the 'frac' of elements beyond ADAM_GOAL, each explained or not."""
    before = run.init if i == 0 else run.ref_states[i - 1]
    names = run.param_names
    m = per_tensor(ours, ref_state, names)
    total = beyond = unexplained = 0
    for k in names:
        diff = np.abs(ours[k].astype(np.float64) - ref_state[k])
        mask = diff > ADAM_GOAL * np.abs(ref_state[k]).max()
        total, beyond = total + mask.size, beyond + int(mask.sum())
        if mask.any():  # Adam's sensitivity: |d update / d g| <= 2 lr / (sqrt(v_hat) + eps)
            # gradient noise relative to the tensor's scale; for a tensor whose exact gradient is 0
            # (jax_side.zero_gradient_params), to the largest gradient: all of it is noise there
            scale = (np.abs(run.ref_grads[i][k]).max() if k not in run.zero else
                     max(np.abs(g).max() for g in run.ref_grads[i].values()))
            noise = ADAM_GRAD_REL * scale
            bound = (np.minimum(2 * lr * noise / (run.ref_sqrt_vhat[i][k] + 1e-8), 2 * lr)
                     + ADAM_GOAL * np.abs(ref_state[k] - before[k]))
            unexplained += int(np.sum(mask & (diff > bound)))
    return dataclasses.replace(
        m, frac=beyond / total, ok=unexplained == 0,
        note=f"{m.note}; {beyond} of {total} elements beyond {ADAM_GOAL:g} rel, "
             f"{unexplained} not explained by {fmt(ADAM_GRAD_REL)}-rel gradient noise")


def _step_measures(run: SimpleNamespace, part: str, mode: str, lr: float) -> Measure:
    """Worst step of ``part`` ('loss', 'params', 'update', 'batch_stats') for 'free' or 'forced' JAX runs."""
    losses, states = getattr(run, f"{mode}_losses"), getattr(run, f"{mode}_states")
    if part == "loss":
        errs = [abs(j - t) for t, j in zip(run.ref_losses, losses)]
        rels = [e / abs(t) for e, t in zip(errs, run.ref_losses)]
        i = int(np.argmax(rels))
        return Measure(max(errs), rels[i], f"worst step {i + 1}")
    pairs = list(zip(run.ref_states, states))
    if part == "batch_stats":
        counts_ok = all(counts_equal(j, t) for t, j in pairs)
        return dataclasses.replace(worst_over_steps([per_tensor(j, t, bn_names(t)) for t, j in pairs]),
                                   ok=counts_ok)
    names = run.param_names
    if part == "update":
        return worst_over_steps([per_tensor({k: j[k] - run.init[k] for k in names},
                                            {k: t[k] - run.init[k] for k in names}, names) for t, j in pairs])
    ms = [_adam_params_step(run, i, t, j, lr) for i, (t, j) in enumerate(pairs)]
    worst = int(np.argmax([x.frac for x in ms]))
    return dataclasses.replace(ms[worst], abs_err=max(x.abs_err for x in ms), rel_err=max(x.rel_err for x in ms),
                               ok=all(x.ok for x in ms), note=f"{ms[worst].note} at step {worst + 1}")


def check_train_steps(ctx: Context, ref: Reference, net: Net, part: str, optimizer: str = "adam",
                      mode: str = "forced", steps: int = 10, kind: str = "cosine", timesteps: int = 100,
                      lr: float = 1e-3) -> Measure:
    """Per-step parity of a training run, worst step. ``part``:

    - ``loss``: |a - b| / |b| of each step's loss;
    - ``params``: every parameter after each step (per tensor rel; abs per element);
    - ``update``: the accumulated update ``p_i - p_0``, per tensor rel to the update's scale;
    - ``batch_stats``: running statistics per tensor rel, num_batches_tracked exact.

    ``mode='forced'`` (Adam): every JAX step starts from the reference's state before that
    step; the note adds the free-running value (JAX's own state carried through all steps).
    """
    run = _train_run(ctx, ref, net, optimizer, steps, kind, timesteps, lr)
    m = _step_measures(run, part, mode, lr)
    if mode == "forced":
        free = _step_measures(run, part, "free", lr)
        m = dataclasses.replace(m, note=f"{m.note}; free-running: abs {fmt(free.abs_err)}, rel {fmt(free.rel_err)}")
    return m


def check_adam_same_grads(ctx: Context, ref: Reference, net: Net, steps: int = 10, kind: str = "cosine",
                          timesteps: int = 100, lr: float = 1e-3,
                          lr_schedule: tuple[str, int, float] = NO_LR_SCHEDULE) -> Measure:
    """The optimiser alone: the reference's gradients of each step fed to ``make_optimizer(lr)``
    (with ``lr_schedule``: the reference's scheduler and jax_ddpm's schedule), params per tensor."""
    import optax

    run = _train_run(ctx, ref, net, "adam", steps, kind, timesteps, lr, lr_schedule)
    tx = _make_optimizer(lr, lr_schedule)
    params = jax_side.variables(run.init, net)["params"]
    opt_state = jax.jit(tx.init)(params)
    update = ctx.memo(("adam_update", lr, lr_schedule), lambda: jax.jit(
        lambda g, s, p: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p))))
    ms: list[Measure] = []
    for ref_state, grads in zip(run.ref_states, run.ref_grads):
        g = jax_side.variables({**ref_state, **grads}, net)["params"]  # buffers only fill the table
        params, opt_state = update(g, opt_state, params)
        batch_stats = jax_side.variables(ref_state, net).get("batch_stats")
        ours = jax_side.state_dict(training.model_variables(params, batch_stats), net)
        ms.append(per_tensor(ours, ref_state, run.param_names))
    return worst_over_steps(ms)


def check_lr_schedule(ctx: Context, ref: Reference, lr: float, decay_steps: int, end_factor: float,
                      steps: int) -> Measure:
    """The learning rate of updates 0 .. steps - 1: ``training.learning_rate``'s cosine evaluated
    as the train step does (jitted, on the int32 step count, float32), against the reference's;
    abs, and rel to the peak ``lr``."""
    rate = training.learning_rate(lr, "cosine", decay_steps, end_factor)
    f = ctx.memo(("jit_lr", lr, decay_steps, end_factor), lambda: jax.jit(jax.vmap(rate)))
    ours = np.asarray(f(jnp.arange(steps, dtype=jnp.int32)))
    theirs = ref.learning_rates(ctx, lr, decay_steps, end_factor, steps)
    if ours.dtype != np.float32 or ours.shape != (steps,):
        return Measure(math.nan, math.nan, f"rates {ours.dtype}{ours.shape}", ok=False)
    err = np.abs(ours.astype(np.float64) - theirs)
    worst = int(np.argmax(err))
    return Measure(float(err.max()), float(err.max()) / lr,
                   f"{steps} updates, worst at update {worst} ({theirs[worst]:.3g}); last {theirs[-1]:.3g}")


__all__: Sequence[str] = ["check_adam_same_grads", "check_grads", "check_loss", "check_lr_schedule",
                          "check_train_steps"]
