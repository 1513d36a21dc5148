"""Check of the weight conversion: reference state dict -> Flax variables -> reference names."""
from __future__ import annotations

import math

import jax
import numpy as np

from jax_ddpm import convert

from .. import jax_side
from ..context import Context
from ..core import Measure
from ..inputs import Net, normal, rng
from ..references import Reference


def check_round_trip(ctx: Context, ref: Reference, net: Net) -> Measure:
    """state dict -> Flax variables -> state dict: bit-exact, same dtypes, loads strictly into a fresh model.

    The Flax side is checked against the model's own variables (``like``: every converted
    tensor has the shape the Flax module initialises).
    """
    gen = rng("round_trip", net)
    model = ref.unet(ctx, net, seed=6)
    # non-trivial BN buffers and counts
    ref.forward(ctx, model, normal(gen, (2, net.size, net.size, net.img_channels)), np.array([3, 7]), train=True)
    sd = ref.state_dict(model)
    table = jax_side.weight_table(net)
    like = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), jax_side.init_shapes(ctx, net))
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(sd, like=like, table=table), table=table)
    problems = sorted(set(sd) ^ set(back))
    problems += [k for k in sd if k in back and (sd[k].dtype != back[k].dtype or not np.array_equal(sd[k], back[k]))]
    ref.load_state_dict(ref.unet(ctx, net, seed=7), back)  # raises on a missing, unexpected or misshaped tensor
    err = max(float(np.max(np.abs(sd[k].astype(np.float64) - back[k].astype(np.float64))))
              for k in sd if k in back)
    return Measure(err, 0.0 if err == 0 else math.inf, f"{len(sd)} tensors" + (
        f"; differ: {', '.join(problems[:3])}" if problems else ", bit-exact, load_state_dict(strict) ok"),
                   ok=not problems)
