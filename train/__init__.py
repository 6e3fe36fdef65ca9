"""Offline training and evaluation of the DDPM U-Net on CelebA (imports model/, never service/)."""
