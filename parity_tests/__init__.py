"""Parity between jax_ddpm and its references: torch_ref, diffusers and float64 NumPy oracles.

The same inputs go through jax_ddpm and a reference; each case measures one component
against one reference and gives one row of the table (``pytest parity_tests`` asserts the
rows, ``jax-ddpm parity`` / ``python -m parity_tests`` prints them). Layout:

- ``core``: Measure, Row, Case, ``run_case`` and the error metrics;
- ``context``: the device both frameworks run on (``make_context``) and its cache;
- ``inputs``: U-Net configurations (``Net``: the chapter's; ``UNet2DNet``: diffusers'
  UNet2DModel, float32 or float64) and seeded inputs; ``jax_side``: the side under test
  (model through the architecture registry, weights, train states);
- ``references/``: one adapter per reference behind one interface (``REFERENCES``:
  ``oracle`` = the float64 closed forms, ``torch`` = torch_ref, ``diffusers`` = diffusers'
  UNet2DModel, DDPMScheduler and a torch Adam step); a reference says which components it
  ``supports``, and ``unavailable()`` when its package is not installed (its rows: skipped);
- ``checks/``: one check per component, written once, run against each reference;
- ``tolerances``: the table keyed by (component, reference, dtype, device), derivations beside;
- ``cases``: the case list as data; ``render``: the Markdown table; ``cli``: ``main(argv)``;
- ``report``: the names code imported before this layout; ``oracle``: the oracle's formulas
  (``from parity_tests import oracle``); ``variants``: a function with and without ``jax.jit``.

Importing this package (or ``oracle``, ``references``, ``tolerances``) imports neither framework.
"""
