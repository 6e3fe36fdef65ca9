"""Two replicas behind Debian's nginx running deploy/nginx/nginx.conf, live on loopback: job handles reach the
replica that holds them, and a rolling update's SIGTERM mid-load loses nothing.

The shipped config is used as it is, with only the addresses (compose's api-0:8000 and api-1:8000 become loopback
ports), the log and temp paths changed."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, tool
from service_helpers import decode_png, free_port, metric, wait_ready
from test_jobs import events

CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
LOG = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d+) \d+ upstream=(?P<addr>.*) upstream_status=(?P<ustatus>.*) '
                 r'(?P<time>[\d.]+) (?P<msec>[\d.]+)$')


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    return tool("nginx", "nginx")


def nginx_config(tmp: Path, replica_ports: list[int], listen: int) -> Path:
    """deploy/nginx/nginx.conf with loopback addresses and paths under tmp (every replacement must apply)."""
    text = CONF.read_text()
    changes = [(f"api-{i}:8000", f"127.0.0.1:{p}") for i, p in enumerate(replica_ports)]
    changes += [("listen 8000;", f"listen 127.0.0.1:{listen};"),
                ("access_log /dev/stdout upstream;", f"access_log {tmp}/access.log upstream;"),
                ("http {\n", "http {\n" + "".join(f"    {k}_temp_path {tmp}/{k};\n"
                                                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")))]
    for old, new in changes:
        assert old in text, f"{CONF} no longer has {old!r}: update this test with it"
        text = text.replace(old, new)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def nginx_cmd(nginx: str, tmp: Path, conf: Path, *extra: str) -> list[str]:
    return [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"),
            "-g", f"daemon off; pid {tmp}/nginx.pid;", *extra]


def start_replica(name: str, port: int, weights: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--weights", str(weights), "--host", "127.0.0.1", "--port", str(port),
         "--replica", name, "--warmup", "false", "--threads", "1", "--max-batch", "4", "--queue-size", "64",
         "--shutdown-grace-s", "30"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


class Cluster:
    def __init__(self, nginx: str, tmp: Path, weights: Path):
        self.tmp = tmp
        self.ports = [free_port(), free_port()]
        self.replicas = [start_replica(f"api-{i}", p, weights, tmp / f"api-{i}.log") for i, p in enumerate(self.ports)]
        self.listen = free_port()
        conf = nginx_config(tmp, self.ports, self.listen)
        self.nginx = subprocess.Popen(nginx_cmd(nginx, tmp, conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for p, proc in zip(self.ports, self.replicas):
            wait_ready(f"http://127.0.0.1:{p}", proc, timeout=120)
        self.url = f"http://127.0.0.1:{self.listen}"
        wait_ready(self.url, self.nginx, timeout=30)

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def access_log(self) -> list[dict]:
        lines = (self.tmp / "access.log").read_text().splitlines()
        return [m.groupdict() for m in map(LOG.search, lines) if m]

    def stop(self) -> None:
        for proc in [self.nginx, *self.replicas]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [self.nginx, *self.replicas]:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def cluster(nginx_bin, tiny_weights, tmp_path_factory):
    c = Cluster(nginx_bin, tmp_path_factory.mktemp("lb"), tiny_weights)
    try:
        yield c
    finally:
        c.stop()


def test_the_shipped_config_passes_nginx_t(nginx_bin, tmp_path):
    conf = nginx_config(tmp_path, [free_port(), free_port()], free_port())
    r = subprocess.run(nginx_cmd(nginx_bin, tmp_path, conf, "-t"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "test is successful" in r.stderr, r.stderr


def test_job_handles_reach_the_replica_that_holds_them(cluster):
    """Jobs made through nginx land on both replicas; each one's status, event stream, images and cancel, all
    through nginx, reach its own replica (without routing, about half would answer 404)."""
    ids = []
    for seed in range(6):
        r = httpx.post(cluster.url + "/v1/jobs", json={"n": 1, "seed": seed, "steps": 30, "sampler": "ddim",
                                                       "preview_every": 10}, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert {i.split(".")[0] for i in ids} == {"api-0", "api-1"}  # least_conn spread them
    for job_id in ids:
        got = events(cluster.url, job_id)
        kinds = [k for k, _ in got]
        assert kinds[-1] == "completed" and "preview" in kinds, kinds  # streamed through the proxy, not buffered
        info = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=30).json()
        assert info["id"] == job_id and info["state"] == "succeeded"
        png = httpx.get(f"{cluster.url}/v1/jobs/{job_id}/images/0", timeout=30)
        assert png.status_code == 200 and decode_png(png.content)[0].ndim == 3
    # cancel a long job on each replica through nginx, each as soon as it is made (a fast CPU ends them in ~0.3 s)
    long_ids = []
    while {i.split(".")[0] for i in long_ids} != {"api-0", "api-1"}:
        assert len(long_ids) < 8
        r = httpx.post(cluster.url + "/v1/jobs", json={"n": 1, "steps": 1000}, timeout=30)
        job_id = r.json()["id"]
        long_ids.append(job_id)
        r = httpx.delete(f"{cluster.url}/v1/jobs/{job_id}", timeout=30)
        assert r.status_code == 200, r.text
        end = time.monotonic() + 20
        while httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=30).json()["state"] not in TERMINAL_STATES:
            assert time.monotonic() < end
            time.sleep(0.05)
        assert httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=30).json()["state"] == "cancelled"
    # what the routing map sent where: every job request went to the replica named in its id
    for entry in cluster.access_log():
        m = re.search(r"/v1/jobs/(api-\d)\.", entry["request"])
        if m:
            assert entry["addr"] == f"127.0.0.1:{cluster.ports[int(m[1][-1])]}", entry


def test_sigterm_mid_load_loses_nothing(cluster):
    """A bounded load (6 clients, 48 requests of 200 steps, at most 120 s) while api-0 gets SIGTERM, as in a
    rolling update: every client gets its 200 (nginx retries what the draining replica refuses on api-1), the
    requests in flight on api-0 finish there, and api-0 exits on its own after saying its in-flight work finished."""
    total, clients = 48, 6
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    sent = iter(range(total))
    deadline = time.monotonic() + 120

    def client():
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    seed = next(sent, None)
                if seed is None:
                    return
                r = http.post(cluster.url + "/generate", json={"n": 1, "seed": seed, "steps": 200},
                              headers={"Accept": "image/png"})
                with lock:
                    results.append((r.status_code, r.headers.get("content-type", "")))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    victim = cluster.replicas[0]
    end = time.monotonic() + 60
    while not (len(results) >= 8 and metric(cluster.replica_url(0), "celeba_ddpm_active_samples") >= 1):
        assert time.monotonic() < end, "api-0 never had work in flight"
        time.sleep(0.01)
    sigterm_at = time.time()
    victim.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=150)
    assert len(results) == total, f"{len(results)} of {total} answered in the time allowed"
    assert [s for s, _ in results] == [200] * total, sorted({s for s, _ in results})
    assert all(ct == "image/png" for _, ct in results)

    assert victim.wait(timeout=45) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop
    replica_log = (cluster.tmp / "api-0.log").read_text()
    assert "drain: in-flight work finished" in replica_log and "unfinished" not in replica_log, replica_log[-2000:]

    log = [e for e in cluster.access_log() if e["request"].startswith("POST /generate")]
    assert len(log) == total
    on_victim = f"127.0.0.1:{cluster.ports[0]}"
    # requests that were running on api-0 when SIGTERM came, answered by api-0 alone after it
    finished_there = [e for e in log if e["addr"] == on_victim and e["status"] == "200"
                      and float(e["msec"]) - float(e["time"]) < sigterm_at < float(e["msec"])]
    assert finished_there, "no request was in flight on api-0 at SIGTERM"
    # after SIGTERM, new work went to api-1 (first try, or retried there after api-0 refused)
    later = [e for e in log if float(e["msec"]) - float(e["time"]) > sigterm_at + 0.5]
    assert later and all(e["addr"].endswith(f":{cluster.ports[1]}") for e in later), later
