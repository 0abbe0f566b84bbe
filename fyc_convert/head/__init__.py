"""The head's math: the Walsh–Hadamard transform and its reference, sign frames, the fixed head modules, row
assignment, the α/bias fits and the head record (one codec for the ONNX metadata and the safetensors header).
Imports nothing else of fyc_convert but errors."""
