"""How every benchmark reports: it prints its results (a markdown section: header, table, notes) and, given
`--out`, writes them to that bench/results file, or adds them to it for the scripts whose runs accumulate there."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran `script` (its __file__) with `argv` (default: this process's), as a results file
    records it: `python bench/NAME.py ARGS`, quoted so that it can be pasted back."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{Path(script).name}", *map(shlex.quote, args)])


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The machine a result was measured on: architecture, CPU model and widest vector extension, cores. These VMs
    change host between days (an AVX2 host one day, an AVX-512 one another, the same benchmark 2x apart), so
    results from different days compare only on the same CPU."""
    info = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")) if flag in flags),
               "")
    if flags & {"avx512_bf16", "amx_bf16"}:
        isa += " with bf16"
    cpu = info.get("model name") or platform.processor() or "cpu"
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')}{', ' + isa if isa else ''})"
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} cores"


def stamp() -> str:
    """A results file's first line: `- date: ..., machine: ...` (see machine())."""
    return f"- date: {time.strftime('%Y-%m-%d %H:%M')}, machine: {machine()}"


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
