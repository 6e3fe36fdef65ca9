"""The benchmark scripts under bench/ stay runnable: each one parses its flags, which imports all it needs, and they
all report through bench/report.py. (The benchmarks themselves are timed runs, never tests: README, Performance.)"""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if "argparse" in p.read_text())


def bench_extra() -> set[str]:
    """The import names of pyproject.toml's `bench` extra (what only benchmarks need: not installed by the tests)."""
    text = (ROOT / "pyproject.toml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("bench = ["))
    return {re.split(r"[<>=\[]", req)[0].strip().replace("-", "_") for req in re.findall(r'"([^"]+)"', line)}


def test_every_benchmark_script_is_found():
    names = {p.name for p in SCRIPTS}
    assert {"runner.py", "runner_profile.py", "sampler.py", "service_load.py", "thread_policy.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports_and_parses_its_flags(script):
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    missing = re.search(r"No module named '(\w+)", r.stderr)
    if r.returncode and missing and missing.group(1) in bench_extra():
        pytest.skip(f"{script.name} needs {missing.group(1)}, from the bench extra (pip install -e '.[bench]')")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: "), r.stdout[:500]


def test_report_writes_or_appends_the_printed_section(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from report import emit

    out = tmp_path / "results" / "x.md"  # its folder is made
    emit(["# A", "", "| a |"], str(out))
    assert out.read_text() == "# A\n\n| a |\n" and capsys.readouterr().out == "# A\n\n| a |\n\n"
    emit("# B\n", str(out))  # replaces
    assert out.read_text() == "# B\n"
    emit(["# C"], str(out), append=True)  # runs that accumulate in one file, a blank line apart
    emit(["# D"], str(out), append=True)
    assert out.read_text() == "# B\n# C\n\n# D\n\n"
    emit(["# E"], None)  # printed only
    assert capsys.readouterr().out.endswith("# E\n\n")
