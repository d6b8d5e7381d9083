"""``embcompress compress``: any registered method, or structure+storage, on a checkpoint's tables, by byte budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import workspace
from ..methods import get
from ..errors import InputError
from ..ops.compress import compress as compress_checkpoint
from ..ops.compress import compress_trimmed
from ..ops.plan import AUTO, compress_auto
from .. import core
from ._options import CheckpointArg, DeviceOpt, ForceOpt, JsonOpt, OutputOpt, TablesOpt, split_list
from ._progress import spinner
from ._render import console, human_bytes, print_json, shape, table

EXAMPLES = """Examples:

  embcompress compress ./all-MiniLM-L6-v2 --method lowbit --budget 0.10        (bits and group size chosen)

  embcompress compress ./all-MiniLM-L6-v2 --method lowbit --set bits=2 --set group_size=32

  embcompress compress ./all-MiniLM-L6-v2 --method pq --budget 2MB -o ./minilm-pq

  embcompress compress ./all-MiniLM-L6-v2 --method pq --subvector 4 --centroids 256 --corpus texts.txt

  embcompress compress dan.safetensors --method svd+int8 --budget 0.05

  embcompress compress dan.safetensors --method groupreduce --budget 0.1 --corpus train.jsonl --json

  embcompress compress ./all-MiniLM-L6-v2 --method auto --budget 0.05 --data texts.txt   (every method measured)

  embcompress compress ./all-MiniLM-L6-v2 --method lowbit --budget 0.05 --trim served-texts.txt

  embcompress methods        (every registered method and its options)
"""


def compress(
    path: CheckpointArg,
    method: Annotated[str, typer.Option("--method", "-m", help="A registered structure or storage, or "
                      "structure+storage (svd+int8); `embcompress methods` lists them. auto: every method measured "
                      "at --budget on --data, the best written.")],
    budget: Annotated[str | None, typer.Option("--budget", "-b", help="Bytes for the tables: a fraction of their "
                      "float32 bytes (0.05) or a size (2MB). The method picks its own parameters to fit.",
                      show_default=False)] = None,
    options: Annotated[list[str] | None, typer.Option("--set", help="A method option, name=value (repeatable): "
                       "rank=64, bits=2, group_size=32, subvector=4, centroids=256 ...", show_default=False)] = None,
    subvector: Annotated[int | None, typer.Option("--subvector", help="pq: dims a code stands for (the same as "
                         "--set subvector=S; it must divide the table's width).", show_default=False)] = None,
    centroids: Annotated[int | None, typer.Option("--centroids", help="pq: centroids per subspace, at most 256 "
                         "and the table's rows (the same as --set centroids=K).", show_default=False)] = None,
    tables: TablesOpt = None,
    counts: Annotated[Path | None, typer.Option("--counts", help="Token counts (one 'token count' or 'id count' "
                      "a line) for methods that weight by frequency.", show_default=False)] = None,
    corpus: Annotated[Path | None, typer.Option("--corpus", help="Texts (.txt or .jsonl) whose tokens are counted "
                      "with the model's tokenizer.", show_default=False)] = None,
    data: Annotated[Path | None, typer.Option("--data", help="With --method auto: the texts (.txt, or .jsonl with "
                    "text and optional label) every method is scored on.", show_default=False)] = None,
    min_quality: Annotated[float | None, typer.Option("--min-quality", help="With --method auto: write the "
                           "smallest representation whose quality (mean cosine, or accuracy) reaches this, in (0, 1].",
                           show_default=False)] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="With --method auto: the comma-separated methods "
                       "to measure (default: every registered one and combination).", show_default=False)] = None,
    output: OutputOpt = None,
    trim: Annotated[Path | None, typer.Option("--trim", help="Texts: first keep only the vocabulary rows they use "
                    "(as `embcompress trim`), then compress the rest; --budget stays a share of the original "
                    "tables, so the freed rows buy more bits.", show_default=False)] = None,
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
    json: JsonOpt = False,
) -> None:
    """Compress a checkpoint's embedding tables with any registered method, sized by a byte budget.

    The output is the same kind as the input (a file, or a model folder with its config and tokenizer) and records
    each table's structure, storage and options, so `evaluate`, `finetune` and `export` read it back. Without
    `--budget`, the method's options (`--set`) or its defaults apply.
    """
    workspace.check_record()
    if method == AUTO:
        _auto(path, budget, data, min_quality, methods, corpus, output, force, device, json)
        return
    options = [*(options or []), *(f"{k}={v}" for k, v in (("subvector", subvector), ("centroids", centroids))
                                   if v is not None)]
    s_opts, t_opts = core.split_options(method, options)
    for part in method.split("+"):
        if part.strip() and part.strip() != "dense":
            get(part.strip())
    with spinner("reading checkpoint", not json) as say:
        if trim is not None:
            if counts is not None:
                raise InputError("--trim counts tokens in the trimmed vocabulary: give --corpus, not --counts")
            result = compress_trimmed(path, method, trim, budget=budget, options=s_opts, storage_options=t_opts,
                                      tables=split_list(tables), corpus=corpus, output=output, force=force,
                                      device=device, progress=say)
        else:
            result = compress_checkpoint(path, method, budget=budget, options=s_opts, storage_options=t_opts,
                                         tables=split_list(tables), counts=counts, corpus=corpus, output=output,
                                         force=force, device=device, progress=say)
    workspace.record(
        "compress",
        options={"method": method, "budget": budget, "set": options or [], "tables": split_list(tables),
                 "trim": str(trim) if trim is not None else None},
        inputs=[("model", path)] + ([("texts", trim)] if trim is not None else []),
        outputs=[("model", Path(result.output))],
        figures={"table_bytes_before": result.table_bytes_before, "table_bytes_after": result.table_bytes_after,
                 "file_bytes_after": result.file_bytes_after},
    )
    if json:
        print_json(result.to_dict())
        return
    console.print(table(
        f"Compressed {result.input} -> {result.output} ({method})",
        ["table", "shape", "method", "chosen", "float32", "stored", "fraction", "rel. error"],
        [[t["name"], shape(t["shape"]), t["method"], _chosen(t), human_bytes(t["float32_bytes"]),
          human_bytes(t["bytes"]), f"{t['fraction']:.4f}",
          f"{t['info']['rel_error']:.4f}" if t["info"].get("rel_error") is not None else "-"] for t in result.tables],
    ))
    why = f"; budget {human_bytes(result.budget_bytes)}" if result.budget_bytes is not None else ""
    if result.trimmed is not None:
        console.print(f"trimmed to the {result.trimmed['rows_after']} of {result.trimmed['rows_before']} rows "
                      f"{result.trimmed['corpus']} uses, then compressed")
    console.print(f"tables {human_bytes(result.table_bytes_before)} -> {human_bytes(result.table_bytes_after)}"
                  f"{why}; file {human_bytes(result.file_bytes_before)} -> {human_bytes(result.file_bytes_after)} "
                  f"in {result.seconds:.1f} s")


def _chosen(t: dict[str, Any]) -> str:
    keep = {k: v for k, v in {**t["config"], **t["storage_config"]}.items()
            if v is not None and k not in ("force", "seed", "iterations", "algorithm")}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) or "-"


def _auto(path: Path, budget: str | None, data: Path | None, min_quality: float | None, methods: str | None,
          corpus: Path | None, output: Path | None, force: bool, device: str, json: bool) -> None:
    with spinner("measuring every method", not json) as say:
        result = compress_auto(path, budget=budget, data=data, min_quality=min_quality, methods=methods,
                               corpus=corpus, output=output, force=force, device=device, progress=say)
    written = result.written
    workspace.record("compress", options={"method": AUTO, "budget": budget, "min_quality": min_quality,
                                          "methods": methods},
                     inputs=[("model", path), ("data", data)], outputs=[("model", Path(written.output))],
                     figures={"chosen": written.method, "quality": result.choice.row.quality,
                              "why": result.choice.why, "cosine": result.choice.row.cosine,
                              "table_bytes_before": written.table_bytes_before,
                              "table_bytes_after": written.table_bytes_after, "file_bytes_after": written.file_bytes_after})
    if json:
        print_json(result.to_dict())
        return
    front = [[r.method, human_bytes(r.table_bytes or 0), f"{(r.table_bytes or 0) / result.sweep.float32_bytes:.4f}",
              f"{r.quality:.4f}", "<-" if r is result.choice.row else ""] for r in result.choice.front]
    console.print(table(f"The front on {data} ({result.sweep.settings['texts']} texts; {result.sweep.quality})",
                        ["method", "table", "x float32", "quality", "chosen"], front))
    console.print(f"chose {written.method}: {result.choice.why}")
    cache = result.settings
    if cache["rows_from_cache"]:
        console.print(f"{cache['rows_from_cache']} rows read from the cache {cache['cache']} (measured earlier by "
                      "compare or auto" + ("; the chosen tables written as measured)" if cache["tables_from_cache"]
                                           else ")"))
    console.print(f"wrote {written.output}: tables {human_bytes(written.table_bytes_before)} -> "
                  f"{human_bytes(written.table_bytes_after)}, file {human_bytes(written.file_bytes_before)} -> "
                  f"{human_bytes(written.file_bytes_after)}")
