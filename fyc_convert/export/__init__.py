"""Models out: the head's ONNX graph layouts, the ONNX export and splice, static checks, verification, latency.
Uses `head/` and `model/`."""
