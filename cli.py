"""The `edge-memdec` command line: a thin typer layer over the edge_memdec library.

Every command turns a UserError into one line on stderr and exit status 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edge_memdec.errors import UserError

app = typer.Typer(
    name="edge-memdec",
    help="Memory Decoder on the edge: convert, inspect, chat, perplexity, serve, and train memory decoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point: run the app, reporting user mistakes in one sentence."""
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---- convert / inspect (GGUF export) ----

# ---- chat / perplexity (the edge runtime) ----

# ---- training: datastore, knn-targets, train, recipe ----

# ---- serve ----


if __name__ == "__main__":
    main()
