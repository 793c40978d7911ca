"""Flow matching for the DiTs: the pyramidal flow of METHODS.md §3 and the full-resolution flow as its baseline.

pyramid.py holds the stages, the path, training pairs and jump renoising; sampler.py the Euler sampler and guidance.
Models enter only as callables (velocity_fn(x, t, factor)); this package imports torch only.
"""
from hpcvid.flow.pyramid import (FLOW_KINDS, PyramidalFlow, StageBatch, block_noise, default_windows, down,
                                 jump_coefficients, make_flow, text_dropout_mask, up2)
from hpcvid.flow.sampler import KnownFrames, combine_guidance, sample

__all__ = ["FLOW_KINDS", "KnownFrames", "PyramidalFlow", "StageBatch", "block_noise", "combine_guidance", "default_windows", "down",
           "jump_coefficients", "make_flow", "sample", "text_dropout_mask", "up2"]
