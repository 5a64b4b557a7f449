"""dlm_titan: a torchtitan-style trainer for masked diffusion language models."""

__version__ = "0.1.0"
