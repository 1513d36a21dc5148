"""Side-by-side measurements of jax_ddpm and torch_ref (``python -m benchmarks``, ``jax-ddpm bench``).

Modules: ``measure`` (timing, peaks, FLOPs, memory, machine), ``cases`` (model sizes and one
runner per implementation), ``suite`` (the run), ``output`` (JSON, Markdown, PNG),
``scaling`` (data-parallel scaling, its own entry point). See benchmarks/README.md.
"""
__all__ = ["cases", "measure", "output", "suite"]
