"""How every benchmark reports: it prints its results (a markdown section: header, table, notes) and, given
`--out`, writes them to that bench/results file, or adds them to it for the scripts whose runs accumulate there."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran `script` (its __file__) with `argv` (default: this process's), as a results file
    records it: `python bench/NAME.py ARGS`, quoted so that it can be pasted back."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{Path(script).name}", *map(shlex.quote, args)])


def emit(text: str | list[str], out: str | None, append: bool = False) -> None:
    """Print `text` (a string, or lines to join) and write it to `out` if given: replacing the file, or with
    `append` adding it after what the file holds, a blank line after it."""
    if not isinstance(text, str):
        text = "\n".join(text) + "\n"
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if append else "w") as f:
            f.write(text + "\n" if append else text)
