"""kla-tl: TileLang kernels for Kaczmarz Linear Attention (KLA).

Public API (layouts as in fla; see :mod:`kla_tl.conventions`):

- :func:`chunk_kla` -- chunkwise forward/backward (training, prefill)
- :func:`fused_recurrent_kla` -- token-by-token path for short sequences
- :func:`kla_decode` -- one token per row on a state pool, in place (serving)
- :func:`naive_kla`, :func:`chunk_kla_reference`, :func:`kla_decode_reference`, :func:`fused_recurrent_kla_reference`
  -- the torch references (any dtype, float64 included)

Importing kla_tl does not import tilelang or touch a GPU.
"""

from . import _checkout

_checkout.install()  # source checkout on PYTHONPATH: kla_tl.schedules / kla_tl.autotune -> schedules/, autotune/

from .api import chunk_kla, fused_recurrent_kla, kla_decode  # noqa: E402
from .reference import chunk_kla_reference, fused_recurrent_kla_reference, kla_decode_reference, naive_kla  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "chunk_kla",
    "fused_recurrent_kla",
    "kla_decode",
    "naive_kla",
    "chunk_kla_reference",
    "kla_decode_reference",
    "fused_recurrent_kla_reference",
    "__version__",
]
