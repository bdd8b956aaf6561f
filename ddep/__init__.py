"""Denoising pretraining for semantic segmentation (DeP and DDeP)."""
