"""tdpo: temporal diffusion policy optimization (TDPO, TDPO-R) for text-to-image diffusion models."""

__version__ = "0.1.0"
