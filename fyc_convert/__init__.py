"""fyc-convert: swap a trained classifier for a fixed Hadamard head (Hoffer et al., ICLR 2018)."""

__version__ = "0.1.0"
