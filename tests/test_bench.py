"""The benchmark scripts under bench/ stay runnable: each one parses its flags, which imports all it needs; the CPU
forward and sampler benchmarks run end to end on the tiny model; they all report through bench/report.py. (What they
time is never asserted here: the figures are in bench/results/, README "Performance".)"""

import re
import shlex
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


def run_bench(script: str, argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT ARGV`; skipped with the reason where it needs a module of the bench extra."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    missing = re.search(r"No module named '(\w+)", r.stderr)
    if r.returncode and missing and missing.group(1) in bench_extra():
        pytest.skip(f"{script} needs {missing.group(1)}, from the bench extra (pip install -e '.[bench]')")
    return r


def test_every_benchmark_script_is_found():
    names = {p.name for p in SCRIPTS}
    assert {"runner.py", "runner_profile.py", "sampler.py", "service_load.py", "thread_policy.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports_and_parses_its_flags(script):
    r = run_bench(script.name, ["--help"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: "), r.stdout[:500]


# the benchmarks behind the CPU figures, each cut to a few seconds on the 8x8 test model
TINY_RUNS = {
    "runner.py": ["--batch", "1", "2", "--rounds", "1", "--min-seconds", "0.05"],
    "runner_backends.py": ["--batch", "1", "--rounds", "1", "--min-seconds", "0.05"],
    "sampler.py": ["--batch", "1", "--steps", "5", "--repeat", "1"],
    "cheaper_networks.py": ["--rounds", "1", "--min-seconds", "0.05"],
    "chain_in_graph.py": ["--steps", "20", "--chain", "5", "10", "--loop", "20", "--rounds", "1"],
    "parallel_in_time.py": ["--steps", "50", "--windows", "4", "--tols", "0.01", "--rounds", "1"],
    "thread_policy.py": ["--tables", "engine", "--rounds", "1", "--engine-reps", "1"],
}

FIRST_ROW = {"cheaper_networks.py": "| the weights' own network |", "parallel_in_time.py": "| forward |",
             "thread_policy.py": "| auto |"}


@pytest.mark.parametrize("script", TINY_RUNS)
def test_benchmark_runs_on_the_tiny_model_and_writes_its_table(script, tiny_weights, tmp_path):
    out = tmp_path / "results" / "bench.md"
    argv = ["--weights", str(tiny_weights), *TINY_RUNS[script], "--out", str(out)]
    r = run_bench(script, argv, timeout=300)  # runner_backends.py times OpenVINO too
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert text in r.stdout  # what it printed is what it wrote
    assert f"- command: `python bench/{script} {shlex.join(argv)}`" in text  # the exact command, to run it again
    first = FIRST_ROW.get(script, "| 1 |")  # batch 1's row, or the weights' own network's
    rows = [line for line in text.splitlines() if line.startswith(first)]
    assert len(rows) == 1 and "nan" not in rows[0] and "inf" not in rows[0], text


def test_picard_iteration_lands_on_the_serial_chain(monkeypatch):
    """bench/parallel_in_time.py's sampler is the same chain computed another way: with a tight tolerance its last
    state is the serial loop's, for a nonlinear stand-in U-Net and a window that does not divide the steps."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import numpy as np
    from parallel_in_time import picard

    rng = np.random.default_rng(0)
    K, shape = 37, (3, 4, 4)
    coef = np.stack([np.arange(K - 1, -1, -1), rng.uniform(0.98, 1.02, K), rng.uniform(-0.2, -0.05, K),
                     np.r_[rng.uniform(0.01, 0.1, K - 1), 0.0]], axis=1)
    x_T, z = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((K, *shape)).astype(np.float32)

    def forward(x, t):  # depends on the state and its step, like the U-Net
        return np.tanh(x * 1.5 + (t / K).reshape(-1, 1, 1, 1)).astype(np.float32)

    x = x_T
    for k in range(K):
        x = coef[k, 1] * x + coef[k, 2] * forward(x[None], coef[k:k + 1, 0])[0] + coef[k, 3] * z[k]
    for window in (1, 5, 8):
        out, iterations, evaluated = picard(forward, x_T, coef, z, window, tol=1e-6)
        np.testing.assert_allclose(out, x, atol=1e-5)
        assert evaluated >= K and iterations <= K  # never fewer rows than the serial chain, never more calls
    assert picard(forward, x_T, coef, z, 1, tol=1e-6)[1:] == (K, K)  # a window of 1 is the serial chain


def test_command_records_the_arguments_quoted(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from report import command

    assert command("/x/bench/sampler.py", ["--out", "a b.md"]) == "python bench/sampler.py --out 'a b.md'"
    monkeypatch.setattr(sys, "argv", ["bench/runner.py", "--batch", "1"])
    assert command("/x/bench/runner.py") == "python bench/runner.py --batch 1"


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


def test_results_name_the_cpu_and_its_vector_extensions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import platform

    from report import machine, stamp

    def cpuinfo(flags: str):
        core = "model name\t: Some CPU\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: {}\n\n".format(flags)
        text = "".join(f"processor\t: {i}\n{core}" for i in range(2))
        (tmp_path / "cpuinfo").write_text(text)
        return machine(tmp_path / "cpuinfo")

    assert cpuinfo("fpu sse2 avx avx2 fma").startswith(f"{platform.machine()}, Some CPU (family 26 model 2, AVX2), ")
    assert "(family 26 model 2, AVX-512 with bf16)" in cpuinfo("avx2 avx512f avx512_bf16")
    assert "(family 26 model 2)" in cpuinfo("fpu sse2")
    assert machine(tmp_path / "absent").startswith(f"{platform.machine()}, ")  # not Linux: what platform knows
    assert re.fullmatch(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d, machine: .+ cores", stamp())


def test_matmul_peak_is_the_best_library_and_says_which(monkeypatch):
    """MKL (torch's) runs AVX2 code on an AMD AVX-512 host, at less than half of ONNX Runtime's MLAS: the "of peak"
    figures divide by the best GEMM on the machine, so both are timed, on the same matrices."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import torch

    from sampler import _gemms, matmul_peak_flops

    calls = _gemms(torch.device("cpu"), torch.float32, 64)
    assert set(calls) == {"torch", "onnxruntime"}
    torch.testing.assert_close(torch.from_numpy(calls["onnxruntime"]()[0]), calls["torch"](), rtol=1e-5, atol=1e-4)
    flops, at = matmul_peak_flops(torch.device("cpu"), torch.float32, sizes=(32, 64), repeats=1)
    assert flops > 0 and re.fullmatch(r"(32x32|64x64), (torch|onnxruntime)", at)


def test_mp_student_times_an_mp_unet_beside_its_teacher(tiny_weights, tmp_path):
    """bench/mp_student.py writes its table (nodes, forward, chain) for the teacher and an mp-unet weights file."""
    from conftest import mp_unet_like_trained

    from model.diffusion import ScheduleConfig
    from model.mp_unet import MPConfig
    from model.unet import PRESETS
    from model.weights import save_weights

    student, out = tmp_path / "mp.safetensors", tmp_path / "results" / "mp.md"
    save_weights(student, mp_unet_like_trained(MPConfig.like(PRESETS["tiny"])), ScheduleConfig(), name="mp",
                 dataset="random (tests)", training_steps=0)
    argv = [str(student), "--weights", str(tiny_weights), "--rounds", "1", "--chain-steps", "20", "--out", str(out)]
    r = run_bench("mp_student.py", argv, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_bench("mp_student.py", [str(tiny_weights), "--weights", str(tiny_weights)], timeout=300)
    assert r.returncode != 0 and "not mp-unet weights" in r.stderr
    text = out.read_text()
    assert f"- command: `python bench/mp_student.py {shlex.join(argv)}`" in text
    rows = [line for line in text.splitlines() if line.startswith(("| teacher, tiny", "| mp-unet, mp"))]
    assert len(rows) == 2 and all(row.count("|") == 7 and "nan" not in row for row in rows), text


def test_train_step_benchmark_times_each_variant_on_the_tiny_model(tmp_path):
    """bench/train_step.py writes one row per preset x batch x variant, with its FLOP count and share of peak."""
    out = tmp_path / "train-step.md"
    argv = ["--presets", "tiny", "--batch", "4", "--steps", "1", "--warmup", "1", "--variants", "fp32", "bf16",
            "--out", str(out)]
    r = run_bench("train_step.py", argv, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert f"- command: `python bench/train_step.py {shlex.join(argv)}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[4] for row in rows] == ["fp32", "bf16"] and not any("nan" in row for row in rows)
