"""Model families behind one adapter (:class:`Family`): detection, loading and saving like the input, tokenizer,
default tables, ONNX graph, trimming's vocabulary rewrite and labelled evaluation.

Built in: ``statedict`` (any checkpoint's tensors), ``classifier`` (the project's DAN and LSTM) and ``transformers``
(Hugging Face folders). A new family is one module ending with ``register_family(MyFamily())``.
"""

from . import classifier, statedict, transformers  # noqa: F401  (each registers its family)
from .base import (
    CLASSIFIER,
    ENCODER,
    Family,
    TrimVocabulary,
    check_same_tokens,
    detect,
    families,
    register_family,
)

__all__ = ["CLASSIFIER", "ENCODER", "Family", "TrimVocabulary", "check_same_tokens", "detect", "families",
           "register_family"]
