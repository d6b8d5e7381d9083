"""``embcompress history``: the workspace record of what was done in this folder."""

from __future__ import annotations

from .. import workspace
from ._options import JsonOpt
from ._render import console, print_json, table

EXAMPLES = """Examples:

  embcompress history

  embcompress history --json
"""


def history(json: JsonOpt = False) -> None:
    """Show the workspace record: each command that wrote an artifact here, its inputs and outputs (with sha256)
    and the figures it printed."""
    path = workspace.record_path()
    entries = workspace.load_record(path)
    if json:
        print_json({"record": str(path) if path else None, "entries": entries})
        return
    if not entries:
        console.print(f"no workspace record at {path}" if path else "workspace recording is off")
        return
    rows = []
    for i, e in enumerate(entries, 1):
        ins = ", ".join(f"{a['role']}={a['path']}" for a in e.get("inputs", []))
        outs = ", ".join(f"{a['path']} ({(a.get('sha256') or '')[:12]})" for a in e.get("outputs", []))
        opts = " ".join(f"{k}={v}" for k, v in e.get("options", {}).items() if v not in (None, False, [], ""))
        rows.append([i, e.get("time", ""), e.get("command", ""), opts, ins, outs])
    console.print(table(f"Workspace record {path}", ["#", "time", "command", "options", "inputs", "outputs"], rows,
                        right={0}))
