"""msn-lightning: Masked Siamese Networks pre-training on Lightning + Hydra + timm."""

__version__ = "0.1.0"
