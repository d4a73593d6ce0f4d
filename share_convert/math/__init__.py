"""The method's mathematics: canonical factors, bases, traces and errors, bounds.

A lazy facade (:mod:`share_convert.facade`): what users, tests and benchmarks import from here.
"""

from __future__ import annotations

from ..facade import lazy_names

#: name -> the module of this package that defines it
_WHERE = {
    "block_form": "bounds",
    "drift_bound": "bounds",
    "frobenius2": "traces",
    "quadratic_form": "bounds",
    "trace_product": "traces",
    "Quantized": "quantize",
    "quantize": "quantize",
    "dequantize": "quantize",
    "stored_bytes": "quantize",
    "dare_mask": "merging",
    "dare_seed": "merging",
    "merge_cores": "merging",
    "ties": "merging",
    "canonicalize": "linalg",
    "canonicalize_padded": "linalg",
    "left_batched": "linalg",
    "principal_basis": "linalg",
    "relative_error": "linalg",
    "residual_spectrum": "linalg",
}

__getattr__, __all__ = lazy_names(__name__, _WHERE)
