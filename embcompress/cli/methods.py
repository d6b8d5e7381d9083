"""``embcompress methods``: every registered structure and storage, with its options, needs and ONNX support."""

from __future__ import annotations

from ..methods import registered
from ._options import JsonOpt
from ._render import console, print_json, table

EXAMPLES = """Examples:

  embcompress methods

  embcompress methods --json
"""


def methods(json: JsonOpt = False) -> None:
    """List every registered method: structures (how a table is shaped) and storages (how its tensors are kept).

    Use one with `embcompress compress --method NAME`, or a structure with a storage as `svd+int8`. Methods from
    other packages appear here once installed (entry point group `embcompress.methods`).
    """
    rows = [m.to_dict() for m in registered()]
    if json:
        print_json(rows)
        return
    console.print(table(
        "Registered methods",
        ["name", "kind", "options (default)", "needs", "onnx", "what it is"],
        [[r["name"], r["kind"], ", ".join(f"{o['name']}={o['default']}" for o in r["options"]) or "-",
          ", ".join(r["needs"]) or "-", "yes" if r["onnx"] else "no", r["description"]] for r in rows],
    ))
