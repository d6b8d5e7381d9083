"""The ``embcompress`` program: builds the Typer app from the command modules and maps errors to exit codes."""

from __future__ import annotations

import sys

import typer

from . import compare, compress, evaluate, export, factorize, finetune, history, inspect, methods, quantize, train, trim
from ._errors import exit_code_for, interruptible, prepare

app = typer.Typer(
    name="embcompress",
    help="Shrink the token-embedding tables of text models by low-rank factorization, and measure the cost.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module in (inspect, compress, factorize, quantize, trim, train, finetune, evaluate, export, compare, methods,
               history):
    name = module.__name__.rsplit(".", 1)[-1]
    app.command(name=name, epilog=module.EXAMPLES)(interruptible(getattr(module, name)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        prepare()
        app(args=argv, prog_name="embcompress")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        return exit_code_for(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
