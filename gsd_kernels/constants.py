"""Numerical constants shared by every backend (docs/design.md).

`CLOSE_PAIR_TOL[dtype]`: a pair whose Gram-trick squared distance is at most
`CLOSE_PAIR_TOL * (|x_i|^2 + |x_j|^2)` (and whose norms are not both 0) is recomputed
exactly from the rows. The C++ kernels hold the same numbers (csrc/include/gsd/iso_math.h,
exposed as `_C.CLOSE_PAIR_TOL_FLOAT32/64`) and the Triton kernels import these; a test
checks that all of them agree. Why these values: docs/design.md, "Close pairs".
"""

import torch

CLOSE_PAIR_TOL = {torch.float32: 1e-2, torch.float64: 1e-6}

__all__ = ["CLOSE_PAIR_TOL"]
