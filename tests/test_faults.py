"""The service as a process under faults and abusive clients: kill -9 and restart, unusable weights files, idle
connections and a slowloris client. Loopback only; every loop is bounded."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from safetensors.torch import save_file

from conftest import ROOT
from service_helpers import free_port, metric, wait_ready


def start(args, env=None):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}", port


def test_kill_9_under_load_then_start_again(tiny_weights, tmp_path):
    before = sorted(p.name for p in (ROOT / "weights").iterdir())
    args = ["--weights", str(tiny_weights), "--warmup", "false"]
    proc, url, port = start(args)
    try:
        wait_ready(url, proc)
        with ThreadPoolExecutor(4) as ex:
            pending = [ex.submit(httpx.post, url + "/generate", json={"n": 2, "seed": i, "steps": 1000}, timeout=60)
                       for i in range(4)]
            end = time.monotonic() + 30  # killed while they run (not after a fixed sleep they may outlast)
            while metric(url, "celeba_ddpm_active_samples") < 1:
                assert time.monotonic() < end, "no request started"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            for f in pending:  # the clients see a closed connection, not a hang
                with pytest.raises(httpx.TransportError):
                    f.result(timeout=30)
    finally:
        proc.kill()
    proc, url, _ = start(args)
    try:
        wait_ready(url, proc, timeout=60)
        r = httpx.post(url + "/generate", json={"n": 1, "seed": 1, "steps": 3, "sampler": "ddim"}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.kill()
    assert sorted(p.name for p in (ROOT / "weights").iterdir()) == before  # nothing written, nothing half-written


def _bad_weights(tmp_path, tiny_weights):
    data = tiny_weights.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    save_file({"w": __import__("torch").zeros(2)}, str(tmp_path / "nometa.safetensors"), metadata={"format": "x"})
    (tmp_path / "folder.safetensors").mkdir()
    return {"truncated": tmp_path / "truncated.safetensors", "wrong format": tmp_path / "pickle.safetensors",
            "wrong metadata": tmp_path / "nometa.safetensors", "not a file": tmp_path / "folder.safetensors",
            "missing": tmp_path / "missing.safetensors"}


def test_unusable_weights_stop_start_up_fast_with_one_line(tmp_path, tiny_weights):
    for kind, path in _bad_weights(tmp_path, tiny_weights).items():
        t0 = time.monotonic()
        proc, _, _ = start(["--weights", str(path)])
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        lines = [line for line in out.splitlines() if line.strip()]
        assert proc.returncode == 2 and took < 10, (kind, proc.returncode, took, out)
        assert len(lines) == 1 and str(path) in lines[0] and lines[0].startswith("error:"), (kind, out)


def test_idle_connections_and_a_slowloris_client_do_not_starve_others(tiny_weights):
    proc, url, port = start(["--weights", str(tiny_weights), "--warmup", "false"])
    stop = threading.Event()
    socks = []
    try:
        wait_ready(url, proc)
        for _ in range(500):  # idle keep-alive connections that never send a request
            socks.append(socket.create_connection(("127.0.0.1", port)))

        def slowloris():  # a request's headers, one byte every 0.2 s, for at most 20 s
            s = socket.create_connection(("127.0.0.1", port))
            try:
                for ch in b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n":
                    if stop.is_set():
                        return
                    s.send(bytes([ch]))
                    time.sleep(0.2)
            except OSError:
                pass  # the server may close it: fine
            finally:
                s.close()

        threading.Thread(target=slowloris, daemon=True).start()
        time.sleep(1.0)
        for _ in range(3):
            t0 = time.monotonic()
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
            r = httpx.post(url + "/generate", json={"n": 1, "steps": 3, "sampler": "ddim"}, timeout=5)
            assert r.status_code == 200 and time.monotonic() - t0 < 2, time.monotonic() - t0
        info = json.loads(httpx.get(url + "/readyz").text)
        assert info["status"] == "ready"
    finally:
        stop.set()
        for s in socks:
            s.close()
        proc.kill()
