"""Names in the files embcompress writes: the record's metadata key and version, and the tensor names of factors.

Kept apart from the modules that write them so that readers (``hf``, ``classifier``) and writers (``factorize``,
``ops``) import the same names without importing each other.
"""

from __future__ import annotations

from .svd import METHODS as SVD_METHODS

METHODS: tuple[str, ...] = (*SVD_METHODS, "weighted", "groupreduce")  # factorize --method (the paper's verb)
COUNTED_METHODS = ("weighted", "groupreduce")


def factor_names(name: str) -> tuple[str, str]:
    """The tensor names of a table's factors: ``<name>_a`` (V x k) and ``<name>_b`` (k x d)."""
    return f"{name}_a", f"{name}_b"


def groups_name(name: str) -> str:
    """The tensor name of a GroupReduce table's row -> block map: ``<name>_groups`` (V, uint8)."""
    return f"{name}_groups"
