"""Every way to store a table, in one registry: structures (how a table is shaped) and storages (how each of its
tensors is kept). ``register`` adds one; ``get`` and ``registered`` read the registry (built-ins and the entry points
of the group ``embcompress.methods``)."""

from . import fp16, groupreduce, iiq, int8, lowbit, pq, svd, tiered, weighted
from .base import (
    STORAGE,
    STRUCTURE,
    BudgetError,
    Config,
    Context,
    Method,
    StoredTable,
    Table,
    TiedLinear,
    get,
    register,
    registered,
    unregister,
)

__all__ = [
    "STORAGE",
    "STRUCTURE",
    "BudgetError",
    "Config",
    "Context",
    "Method",
    "StoredTable",
    "Table",
    "TiedLinear",
    "fp16",
    "get",
    "groupreduce",
    "iiq",
    "int8",
    "lowbit",
    "pq",
    "register",
    "registered",
    "svd",
    "tiered",
    "unregister",
    "weighted",
]
