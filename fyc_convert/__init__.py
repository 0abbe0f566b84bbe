"""fyc-convert: swap a trained classifier for a fixed Hadamard head (Hoffer, Hubara, Soudry, ICLR 2018).

The public names are imported on first use (PEP 562), so `import fyc_convert` and `fyc-convert --help` do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "fyc_convert.errors",
    "ClassifierNotFoundError": "fyc_convert.errors",
    "DataError": "fyc_convert.errors",
    "ExportError": "fyc_convert.errors",
    "FycError": "fyc_convert.errors",
    "HeadError": "fyc_convert.errors",
    "OptionsError": "fyc_convert.errors",
    "TrainingError": "fyc_convert.errors",
    "VerificationError": "fyc_convert.errors",
    "fwht": "fyc_convert.head.hadamard",
    "HadamardHead": "fyc_convert.head.heads",
    "OrthogonalHead": "fyc_convert.head.heads",
    "cosine_loss": "fyc_convert.head.heads",
    "ConvertOptions": "fyc_convert.options",
    "convert": "fyc_convert.pipeline",
    "Report": "fyc_convert.report",
    "load_converted": "fyc_convert.model.weights",
}

__all__ = [
    "CheckpointError",
    "ClassifierNotFoundError",
    "ConvertOptions",
    "DataError",
    "ExportError",
    "FycError",
    "HadamardHead",
    "HeadError",
    "OptionsError",
    "OrthogonalHead",
    "Report",
    "TrainingError",
    "VerificationError",
    "convert",
    "cosine_loss",
    "fwht",
    "load_converted",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from fyc_convert.errors import (
        CheckpointError,
        ClassifierNotFoundError,
        DataError,
        ExportError,
        FycError,
        HeadError,
        OptionsError,
        TrainingError,
        VerificationError,
    )
    from fyc_convert.head.hadamard import fwht
    from fyc_convert.head.heads import HadamardHead, OrthogonalHead, cosine_loss
    from fyc_convert.model.weights import load_converted
    from fyc_convert.options import ConvertOptions
    from fyc_convert.pipeline import convert
    from fyc_convert.report import Report


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fyc_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
