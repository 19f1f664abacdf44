"""ssimae: unsupervised defect segmentation with SSIM autoencoders (Bergmann et al., VISAPP 2019)."""

__version__ = "0.1.0"
