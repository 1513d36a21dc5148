"""Side-by-side measurements of jax_ddpm against torch_ref and diffusers (``python -m benchmarks``, ``jax-ddpm bench``).

Modules: ``measure`` (timing, peaks, FLOPs, memory, machine), ``cases`` (model sizes and one
runner per implementation; torch_ref's side), ``diffusers_runner`` (diffusers' side of the
unet2d sizes), ``suite`` (the run), ``output`` (JSON, Markdown, PNG), ``scaling``
(data-parallel scaling, its own entry point); the helper scripts ``breakdown``, ``ablation``,
``conv_layers``, ``gemm_bound``, ``strided_parts`` and ``unet2d_ops``. See benchmarks/README.md.
"""
__all__ = ["cases", "measure", "output", "suite"]
