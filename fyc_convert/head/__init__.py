"""The head's math: the Walsh–Hadamard transform and its reference, sign frames, the fixed head modules, row
assignment and the α/bias fit. Imports nothing else of fyc_convert but errors."""
