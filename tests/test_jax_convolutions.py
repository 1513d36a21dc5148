"""jax_ddpm.models.convolutions: the stride-1 rewrites equal lax.conv_general_dilated.

Each case is a convolution the U-Net uses (3x3 stride 1, 4x4 stride 2, the 4x4 transposed
convolution as conv of the 2x-dilated input), at the spatial sizes that pick each rewrite
(1x1 and 2x2 maps take the im2col path). Values and both gradients are compared against
XLA's own convolution in float32; a wrong tap, phase or block order gives O(1) errors.
Tolerance 1e-5 relative to the largest |value|: measured <= 3.2e-7 (float64 runs of the
same cases agree to 1.8e-14, i.e. the two formulations are the same sums).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jax_ddpm.models import UNet
from jax_ddpm.models.convolutions import decomposed_conv, resolve_conv_impl

NHWC = ("NHWC", "HWIO", "NHWC")
RTOL = 1e-5

CASES = [  # (x shape, kernel shape, strides, padding, lhs_dilation)
    ((2, 1, 1, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1)), (1, 1)),   # im2col, map smaller than kernel
    ((2, 2, 2, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1)), (1, 1)),   # im2col
    ((2, 8, 8, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1)), (1, 1)),   # XLA's conv, unchanged
    ((2, 2, 2, 5), (4, 4, 5, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),   # space-to-depth (+ im2col)
    ((2, 8, 6, 5), (4, 4, 5, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),   # space-to-depth
    ((2, 8, 8, 5), (4, 4, 5, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),   # space-to-depth; custom: XLA's +
    ((2, 12, 8, 5), (4, 4, 5, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # sub-pixel input gradient
    ((2, 1, 1, 5), (4, 4, 5, 4), (1, 1), ((2, 2), (2, 2)), (2, 2)),   # sub-pixel (+ im2col)
    ((2, 8, 6, 5), (4, 4, 5, 4), (1, 1), ((2, 2), (2, 2)), (2, 2)),   # sub-pixel
    ((2, 8, 8, 5), (3, 3, 5, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),   # odd kernel: passed through
]


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("custom_gradients", [False, True])
@pytest.mark.parametrize("x_shape,k_shape,strides,padding,dilation", CASES)
def test_decomposed_conv_matches_xla(x_shape, k_shape, strides, padding, dilation, custom_gradients):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    dn = lax.conv_dimension_numbers(x_shape, k_shape, NHWC)

    def xla(x, k):
        return lax.conv_general_dilated(x, k, strides, padding, lhs_dilation=dilation, dimension_numbers=dn)

    def ours(x, k):
        return decomposed_conv(x, k, strides, padding, lhs_dilation=dilation, dimension_numbers=dn,
                               custom_gradients=custom_gradients)

    y_ref, vjp_ref = jax.vjp(xla, x, k)
    y, vjp = jax.vjp(jax.jit(ours), x, k)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < RTOL
    g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert _rel(got, want) < RTOL


def test_unet_conv_impls_same_parameters():
    """Both formulations declare the same parameter tree (names, shapes), so weights, convert.py
    and checkpoints do not depend on conv_impl. (Outputs: parity_tests run the default, 'auto'.)"""
    x = jnp.zeros((2, 16, 16, 1), jnp.float32)
    t = jnp.zeros((2,), jnp.int32)
    shapes = {}
    for impl in ("xla", "decomposed"):
        net = UNet(1, 32, (4, 8, 8, 16), conv_impl=impl)
        shapes[impl] = jax.eval_shape(lambda k, net=net: net.init(k, x, t, train=True), jax.random.PRNGKey(0))
    assert shapes["xla"] == shapes["decomposed"]


def test_resolve_conv_impl():
    assert resolve_conv_impl("xla") == "xla"
    assert resolve_conv_impl("decomposed") == "decomposed"
    assert resolve_conv_impl("auto") == ("decomposed" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        resolve_conv_impl("cudnn")


def test_unet_eval_mode_keeps_forward_mode_differentiation():
    """In evaluation mode the decomposed U-Net has no custom_vjp (the strided convolutions'
    custom gradients are for training only), so jax.jvp works and agrees with XLA's own
    convolutions. 16x16 input: its strided convolutions run at 16x16 and 8x8, sizes at which
    training takes the custom_vjp path."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
    t = jnp.asarray([3, 7], jnp.int32)
    out = {}
    shapes = jax.eval_shape(lambda: UNet(1, 32, (4, 8, 8, 16)).init(jax.random.PRNGKey(0), x, t, train=False))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)  # random values; BN variances > 0

    def fill(path, s):
        if s.dtype != jnp.float32:
            return jnp.zeros(s.shape, s.dtype)
        if "var" in jax.tree_util.keystr(path):
            return jnp.asarray(0.5 + rng.random(s.shape), s.dtype)
        return jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype)

    variables = jax.tree_util.tree_unflatten(treedef, [fill(p, s) for p, s in leaves])
    for impl in ("xla", "decomposed"):  # the same parameter tree (test above)
        net = UNet(1, 32, (4, 8, 8, 16), conv_impl=impl)
        f = jax.jit(lambda x, v, net=net: jax.jvp(lambda x: net.apply(variables, x, t, train=False), (x,), (v,)))
        out[impl] = f(x, v)
    for got, want in zip(out["decomposed"], out["xla"]):
        assert _rel(got, want) < RTOL
