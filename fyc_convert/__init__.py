"""fyc-convert: swap a trained classifier for a fixed Hadamard head (Hoffer, Hubara, Soudry, ICLR 2018)."""

from fyc_convert.errors import (
    CheckpointError,
    ClassifierNotFoundError,
    DataError,
    ExportError,
    FycError,
    HeadError,
    TrainingError,
    VerificationError,
)
from fyc_convert.hadamard import fwht
from fyc_convert.heads import HadamardHead, OrthogonalHead, cosine_loss
from fyc_convert.pipeline import ConvertOptions, convert
from fyc_convert.report import Report
from fyc_convert.weights import load_converted

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ClassifierNotFoundError",
    "ConvertOptions",
    "DataError",
    "ExportError",
    "FycError",
    "HadamardHead",
    "HeadError",
    "OrthogonalHead",
    "Report",
    "TrainingError",
    "VerificationError",
    "convert",
    "cosine_loss",
    "load_converted",
    "fwht",
]
