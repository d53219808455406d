"""dist-decode: DECODE-SZ contrastive VAE, leave-one-site-out training, RSA and specific maps."""
__version__ = "0.1.0"
