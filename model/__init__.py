"""celeba-ddpm's model core: the U-Net, the diffusion maths, the sampler engine and weights I/O (no web code)."""

__version__ = "0.1.0"
