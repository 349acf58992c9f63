"""The six primitives of docs/design.md as Triton kernels.

Every launcher takes and returns torch tensors; the Python layer (``gsd_kernels.ops``)
has already flattened inputs to ``(N, K)``, made them contiguous, cast fp16/bf16 to fp32
and, for the isometry loss, centred x and z and computed their squared row norms.

Host synchronisation
--------------------
None. Scalars that the Python layer holds on the device (``inv_two_h2``, the isometry
coefficients ``coef = [p, q, r, s]``, the SiD ``scale``) are passed to the kernels as
pointers and loaded there; Python floats (``alpha``) travel as kernel scalar arguments.
Triton types a Python float argument as fp32, so a float64 value is passed as three fp32
parts whose float64 sum is exact (``_split3``). Nothing is copied host-to-device or read
back, so the ops can be captured in a CUDA graph (``torch.compile(mode="reduce-overhead")``).

Kernels
-------
Squared distances of a (row tile, column tile) block come in one of three modes, chosen
per input (x and z independently) by the launcher:

* ``MODE_DIRECT`` (dims <= ``DIRECT_MAX`` = 16): ``sum_k (x_ik - x_jk)^2`` from explicit
  differences, and the backward also sums ``a_ij (x_i - x_j)`` directly. In a few
  dimensions close pairs are common and the Gram trick would lose the digits of
  ``x_i - x_j`` that the gradient direction ``(x_i - x_j) / delta`` needs.
* ``MODE_DOT``: Gram trick ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` with ``tl.dot`` over K-chunks
  (tensor cores). Pairs that come out close (``d2 <= tol * (|x_i|^2 + |x_j|^2)`` with the
  one close-pair tolerance of every backend, ``gsd_kernels.constants``; e.g. exact
  duplicates) are recomputed from differences in the rare tiles that hold any
  (``_refine_close``), so a duplicate gets delta = 0 and coefficient 0 as the spec wants.
  Pairs of two zero rows (``|x_i|^2 + |x_j|^2 == 0``, a collapsed batch) are exact already
  and never trigger the recompute.
* ``MODE_FMA``: the Gram trick with an elementwise product-reduce instead of ``tl.dot``;
  only a fallback for targets that cannot compile a float64 ``tl.dot``.

Pair epilogue: in float64 for every input dtype. The squared distances (Gram dots in the
input dtype) are converted to float64 before the sqrt, the weight, the products
``w delta dz``, the coefficients and the per-tile sums. A fp32 sqrt has a small
*systematic* rounding bias that, summed over ~N^2 pairs, moves ``S_xz`` coherently: about
2e-4 relative error of the loss at D = d = 12288, over the 1e-4 target. It costs ~20
fp64 operations per pair against 2 (D + d) dot-product FLOPs per pair (12k at D = d = 3072).

Isometry forward (``_iso_fwd_kernel``)
    One program per (row tile, column tile) block of the pair range, pair terms in
    registers, four float64 partial sums per block to a scratch buffer ``[num_blocks, 4]``
    that torch reduces (deterministic, no N x N). When the row range equals the column
    range only the lower-triangular tiles are launched (decoded from the program id);
    off-diagonal tiles count twice, the diagonal tile once.

Grouped pairs (``groups = g``, ``_iso_grouped_fwd_kernel`` / ``_iso_grouped_bwd_kernel``)
    Row i pairs only with its own block of g rows: one program per row, distances summed
    directly from the rows in float64 (no Gram trick, no close-pair refine), O(N g (D + d)).

Isometry backward: ``gx_i = x_i * rowsum(a)_i - (A @ X)_i`` (same for z with b).
``need_x`` / ``need_z`` False skips that side entirely (no coefficient slab, no GEMM, no
output): in training the latent z needs no gradient.
    * ``max(D, d) <= SMALL_DIM`` (64): flash-attention style (``_iso_bwd_small_kernel``),
      one program per row tile holds its rows of x and z in registers, loops over the
      column tiles, recomputes the distances, forms a and b and accumulates ``A @ X``,
      ``B @ Z`` (``tl.dot``) and the row sums in registers; nothing is stored.
    * large dims (images: D = d = 3072 .. 12288): rows are processed in *slabs* of R rows:
      ``_iso_coef_kernel`` writes the coefficients a, b of the slab (R x C, input dtype)
      to scratch, ``_iso_apply_kernel`` is a GEMM ``A_slab @ X`` per (D-chunk, row tile)
      that adds the row sums on the fly. Its grid runs the D-chunk index fastest, so the
      programs that share one A row-tile run together and the tile is read from HBM once
      and from L2 afterwards. R is chosen so that the two slabs hold no more elements
      than x and z together (or 1M elements, at least one row tile).

SiD / fake-score
    Forward: grid (row, K-split); each program streams its chunk with vector loads and
    forms and sums the per-element terms in float64 (fp32 products of inputs of ~1e20
    overflow; memory bound: ~8 fp64 FLOPs per 12 bytes read is cheap on H100). With
    one split per row the kernel writes the per-row results (loss_n, w_n, valid_n /
    sq_n, valid_n) itself; with several it writes float64 partials that one small
    finishing kernel reduces per row in a fixed order (deterministic).
    Backward: elementwise, grid (row, K-block); the per-row factor is formed in the
    kernel from w_n, valid_n and the device ``scale``; invalid rows get exact zeros.


Layout (as ``csrc/{cpu,cuda}/{iso,sid}_*``)
-------------------------------------------
``common.py`` triton import guard, availability, the tuning knobs (``DOT_PRECISION``,
``TILES``, ...: set them there), launch helpers; ``iso_kernels.py`` / ``iso.py`` the
isometry kernels / launchers; ``sid_kernels.py`` the SiD and fake-score kernels, launched by
``sid.py`` / ``fake.py``; ``aot.py`` ``compile_check``. The precision and tile settings are
described in ``common.py``.
"""

from __future__ import annotations

from .aot import compile_check, compile_variants
from .common import CLOSE_TOL, NAME, is_available
from .fake import fake_backward, fake_forward
from .iso import iso_backward_rows, iso_forward_sums
from .sid import sid_backward, sid_forward


class TritonPrimitives:
    """The primitive set of docs/design.md, served by Triton kernels."""

    name = NAME
    centres_in_kernel = False  # takes centred rows and their squared norms

    @staticmethod
    def is_available(device_type) -> tuple[bool, str]:
        return is_available(device_type)

    iso_forward_sums = staticmethod(iso_forward_sums)
    iso_backward_rows = staticmethod(iso_backward_rows)
    sid_forward = staticmethod(sid_forward)
    sid_backward = staticmethod(sid_backward)
    fake_forward = staticmethod(fake_forward)
    fake_backward = staticmethod(fake_backward)


TRITON = TritonPrimitives()

# The tuning knobs are not re-exported: a setting made on the package would be ignored.
__all__ = [
    "TRITON", "TritonPrimitives", "is_available", "iso_forward_sums", "iso_backward_rows",
    "sid_forward", "sid_backward", "fake_forward", "fake_backward", "compile_check",
    "compile_variants", "CLOSE_TOL", "NAME",
]
