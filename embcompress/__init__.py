"""embcompress: shrink the token-embedding tables of text models by low-rank factorization, and measure the cost.

The public API, one import away::

    from embcompress import load_checkpoint, find_embeddings, factorize, FactorizedEmbedding, compress_embeddings
"""

from ._version import __version__

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import EmbcompressError
from .export import ExportReport
from .ops.export import export_onnx
from .factorize import FactorizeResult, factorize, load_factorized
from .modules import FactorizedEmbedding, GroupedFactorizedEmbedding, TiedFactorizedLinear, compress_embeddings
from .quant import QuantizeResult, dequantize_state, quantize, quantize_state
from .rank import rank_for_reduction
from .summary import inspect_checkpoint
from .tables import EmbeddingTable, find_embeddings

__all__ = [
    "Checkpoint",
    "EmbcompressError",
    "EmbeddingTable",
    "ExportReport",
    "FactorizeResult",
    "FactorizedEmbedding",
    "GroupedFactorizedEmbedding",
    "QuantizeResult",
    "TiedFactorizedLinear",
    "__version__",
    "compress_embeddings",
    "dequantize_state",
    "export_onnx",
    "factorize",
    "find_embeddings",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_factorized",
    "quantize",
    "quantize_state",
    "rank_for_reduction",
    "save_checkpoint",
]
