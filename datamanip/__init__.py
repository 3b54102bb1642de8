"""datamanip: learned data manipulation (weighting and augmentation) for PyTorch models."""

__version__ = "0.1.0"
