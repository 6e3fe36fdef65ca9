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
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model.engine import SamplerEngine, generate
from model.weights import file_sha256, load_weights
from service.settings import Settings

from conftest import ROOT, nearly_equal
from service_helpers import decode_png, free_port, metric, running, slow_steps, wait_ready


@pytest.fixture(scope="module")
def served(tiny_weights):
    # 5 ms more per step (+0.5 s to a chained 1000-step request): what the tests below send after a long request
    # starts must find it still running however fast the CPU
    with running(Settings(weights=tiny_weights, max_batch=8, max_n=8, queue_size=8),
                 app_hook=slow_steps(0.005)) as (url, app):
        yield url, app


def post(url, body, **kw):
    return httpx.post(url + "/generate", json=body, timeout=120, **kw)


def offline(weights_path, seeds, sampler, steps):
    w = load_weights(weights_path)
    return generate(SamplerEngine(w.unet, w.diffusion), seeds, sampler, steps, batch_size=len(seeds))


def test_json_contract(served, tiny_weights):
    url, _ = served
    r = post(url, {"n": 3, "seed": 7, "steps": 20, "sampler": "ddim"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["seed"], body["model"], body["sampler"], body["steps"]) == (7, "tiny-test", "ddim", 20)
    assert [im["seed"] for im in body["images"]] == [7, 8, 9]
    assert set(body["timings"]) == {"queue_s", "generate_s"} and body["timings"]["generate_s"] > 0
    sha = file_sha256(tiny_weights)
    expected = offline(tiny_weights, [7, 8, 9], "ddim", 20)
    for i, im in enumerate(body["images"]):
        pixels, text = decode_png(im["png"])
        assert pixels.shape == (8, 8, 3)
        assert text == {"seed": str(7 + i), "sampler": "ddim", "steps": "20", "weights_sha256": sha,
                        "model": "tiny-test"}
        assert np.array_equal(pixels, expected[i])


def test_random_seed_is_echoed(served):
    url, _ = served
    a, b = post(url, {"steps": 2, "sampler": "ddim"}).json(), post(url, {"steps": 2, "sampler": "ddim"}).json()
    assert 0 <= a["seed"] < 2**53 and a["seed"] != b["seed"]  # exact in every JSON client
    assert a["images"][0]["seed"] == a["seed"]


def test_png_response_matches_offline_cli_for_the_full_ddpm_loop(served, tiny_weights, tmp_path):
    url, _ = served
    r = post(url, {"n": 1, "seed": 11}, headers={"Accept": "image/png"})  # 1000-step ddpm, the default
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "11"
    subprocess.run([sys.executable, "-m", "model.sample", "--weights", str(tiny_weights), "--n", "1", "--seed", "11",
                    "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert r.content == (tmp_path / "11.png").read_bytes()  # same pixels, same provenance chunks
    grid = post(url, {"n": 4, "seed": 1, "steps": 5, "sampler": "ddim"}, headers={"Accept": "image/png"})
    pixels, text = decode_png(grid.content)
    assert pixels.shape == (2 + 2 * 10, 2 + 2 * 10, 3) and text["seeds"] == "1-4"


BAD = [
    ({"n": 0}, "n"), ({"n": 9}, "n: must be at most 8"), ({"n": "4"}, "n"), ({"n": 4.5}, "n"), ({"n": None}, "n"),
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": "7"}, "seed"), ({"seed": 2**53}, "seed"),
    ({"seed": 2**53 - 1, "n": 2}, "seed: must be at most 9007199254740984"),
    ({"steps": 0}, "steps"), ({"steps": 1001}, "steps"), ({"sampler": "euler"}, "sampler"),
    ({"n": 1, "prompt": "a face"}, "prompt: Extra inputs are not permitted"), ({"weights": "/etc/passwd"}, "weights"),
    ({"deadline_s": 0}, "deadline_s"), ([1, 2], "body"),
]


@pytest.mark.parametrize("body,message", BAD)
def test_bad_input_is_a_422_with_a_message(served, body, message):
    url, _ = served
    r = post(url, body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_malformed_json_and_large_bodies(served):
    url, _ = served
    before = metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "invalid"})
    r = httpx.post(url + "/generate", content=b'{"n": 4,', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "invalid"}) == before + 1
    r = httpx.post(url + "/generate", content=json.dumps({"n": 1, "pad": "x" * 10000}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "body_too_large"}) >= 1
    assert metric(url, "celeba_ddpm_http_requests_total",
                  {"endpoint": "/generate", "method": "POST", "status": "413"}) >= 1


def test_results_do_not_depend_on_other_requests_in_the_batch(served):
    url, _ = served
    reqs = [{"n": 2, "seed": 100, "steps": 200, "sampler": "ddpm"}, {"n": 1, "seed": 5, "steps": 30, "sampler": "ddim"},
            {"n": 3, "seed": 50, "steps": 40, "sampler": "dpm-solver++"}, {"n": 1, "seed": 101, "steps": 200}]
    alone = [post(url, b).json() for b in reqs]
    with ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(lambda b: post(url, b).json(), reqs))
    for a, t in zip(alone, together):
        for ia, it in zip(a["images"], t["images"]):
            assert nearly_equal(decode_png(ia["png"])[0], decode_png(it["png"])[0])
    # image 1 of seed 100 is the image of seed 101 alone
    assert nearly_equal(decode_png(alone[0]["images"][1]["png"])[0], decode_png(alone[3]["images"][0]["png"])[0])


def test_short_request_overtakes_a_long_one(served, tiny_weights):
    url, _ = served
    results = {}

    def send(name, body):
        results[name] = (post(url, body), time.monotonic())

    start = metric(url, "celeba_ddpm_sample_denoising_steps_total")
    long = threading.Thread(target=send, args=("long", {"n": 1, "seed": 3, "steps": 1000}))
    long.start()
    while metric(url, "celeba_ddpm_sample_denoising_steps_total") - start < 500:
        time.sleep(0.02)
    send("short", {"n": 1, "seed": 4, "steps": 10, "sampler": "ddim"})
    long.join()
    assert results["short"][1] < results["long"][1]  # the short one did not wait for the long one's 1000 steps
    assert results["long"][0].json()["timings"]["generate_s"] > results["short"][0].json()["timings"]["generate_s"]
    ref_long, ref_short = offline(tiny_weights, [3], "ddpm", 1000)[0], offline(tiny_weights, [4], "ddim", 10)[0]
    assert nearly_equal(decode_png(results["long"][0].json()["images"][0]["png"])[0], ref_long)
    assert nearly_equal(decode_png(results["short"][0].json()["images"][0]["png"])[0], ref_short)


def test_metrics_parse_and_move(served):
    url, _ = served
    text = httpx.get(url + "/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for n in ["celeba_ddpm_http_requests", "celeba_ddpm_http_request_duration_seconds",
              "celeba_ddpm_queue_wait_seconds",
              "celeba_ddpm_generation_duration_seconds", "celeba_ddpm_queue_depth_requests",
              "celeba_ddpm_active_samples", "celeba_ddpm_batch_size_samples", "celeba_ddpm_denoising_steps",
              "celeba_ddpm_images_generated", "celeba_ddpm_step_duration_seconds",
              "celeba_ddpm_gpu_memory_allocated_bytes", "celeba_ddpm_model_info"]:
        assert n in names, n
    images0 = metric(url, "celeba_ddpm_images_generated_total")
    steps0 = metric(url, "celeba_ddpm_sample_denoising_steps_total")
    ok0 = metric(url, "celeba_ddpm_http_requests_total", {"endpoint": "/generate", "method": "POST", "status": "200"})
    assert post(url, {"n": 3, "seed": 1, "steps": 7, "sampler": "ddim"}).status_code == 200
    assert metric(url, "celeba_ddpm_images_generated_total") == images0 + 3
    assert metric(url, "celeba_ddpm_sample_denoising_steps_total") == steps0 + 21
    assert metric(url, "celeba_ddpm_http_requests_total",
                  {"endpoint": "/generate", "method": "POST", "status": "200"}) == ok0 + 1
    assert metric(url, "celeba_ddpm_model_info", {"name": "tiny-test", "device": "cpu", "dtype": "fp32",
                                                  "resolution": "8"}) == 1
    assert "seed=" not in text  # no per-seed labels


def test_spin_threads_runs_a_lone_request_on_every_core_with_the_same_pixels(tiny_weights):
    """SPIN_THREADS: a batch of one runs on a spinning multi-threaded ORT session (its 20 steps as two chained
    calls of 10, model/onnx_chain.py); its PNG is the CLI's, pixel for pixel, as without the setting."""
    with running(Settings(weights=tiny_weights, spin_threads=True, threads=2, warmup=False)) as (url, app):
        r = post(url, {"n": 1, "seed": 7, "sampler": "ddim", "steps": 20})
        runner = app.state.runtime.engine.runner
        assert runner.mode == "onnx" and runner.spin and ("chain", runner.chain_steps, 2) in runner.fn._sessions
        assert httpx.get(url + "/v1/model").json()["spin_threads"] == "true"
    assert np.array_equal(decode_png(r.json()["images"][0]["png"])[0], offline(tiny_weights, [7], "ddim", 20)[0])


def test_warm_up_builds_the_chained_sessions_before_the_first_request(tiny_weights):
    """Batches of up to one row per core run ten steps per ONNX Runtime call (model/onnx_chain.py); the warm-up
    builds that session, and with SPIN_THREADS=auto (the default) the spinning ones a lone request may switch to, so
    the first request builds none."""
    with running(Settings(weights=tiny_weights, max_batch=3, threads=2)) as (url, app):
        runner = app.state.runtime.engine.runner
        built = set(runner.fn._sessions)
        k = runner.chain_steps
        assert runner.spin == "auto" and httpx.get(url + "/v1/model").json()["spin_threads"] == "auto"
        assert k > 1 and built >= {("chain", k, 1), ("chain", k, 2), (1, 2), (2, 1)}  # b=3: shards 2+1


def test_health_model_and_openapi(served):
    url, _ = served
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(url + "/readyz").json()["status"] == "ready"
    info = httpx.get(url + "/v1/model").json()
    assert info["resolution"] == 8 and info["schedule"]["num_timesteps"] == 1000 and info["device"] == "cpu"
    assert info["dtype"] == "fp32" and len(info["sha256"]) == 64
    assert info["architecture"]["kind"] == "unet" and info["architecture"]["base_channels"] == 16
    assert info["runner"] == "onnx"  # CPU default: the U-Net on ONNX Runtime (model/runner.py)
    spec = httpx.get(url + "/openapi.json").json()
    gen = spec["paths"]["/generate"]["post"]
    assert {"200", "401", "413", "422", "503", "504"} <= set(gen["responses"])
    assert "image/png" in gen["responses"]["200"]["content"]
    assert spec["components"]["schemas"]["GenerateRequest"]["examples"][0] == {"n": 4, "seed": 7}
    assert {"/metrics", "/healthz", "/readyz", "/v1/model"} <= set(spec["paths"])


def test_deadline(served):
    url, _ = served
    before = metric(url, "celeba_ddpm_cancelled_requests_total", {"reason": "deadline"})
    # the tiny model's 1000 steps take 0.2-0.5 s on these CPUs: 0.05 s leaves a margin on a faster one
    r = post(url, {"n": 1, "seed": 1, "steps": 1000, "deadline_s": 0.05})
    assert r.status_code == 504 and "deadline" in r.json()["detail"]
    assert metric(url, "celeba_ddpm_cancelled_requests_total", {"reason": "deadline"}) == before + 1


def test_client_disconnect_removes_its_samples(served):
    url, _ = served
    before = metric(url, "celeba_ddpm_cancelled_requests_total", {"reason": "disconnect"})
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"n": 4, "seed": 1, "steps": 1000}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    t0 = time.monotonic()
    while metric(url, "celeba_ddpm_active_samples") < 4 and time.monotonic() - t0 < 20:
        time.sleep(0.02)
    steps_at_close = metric(url, "celeba_ddpm_sample_denoising_steps_total")
    s.close()
    while metric(url, "celeba_ddpm_cancelled_requests_total", {"reason": "disconnect"}) < before + 1:
        assert time.monotonic() - t0 < 20, "disconnect was not noticed"
        time.sleep(0.05)
    assert metric(url, "celeba_ddpm_active_samples") == 0
    # the 4 samples stopped well short of their 4 x 1000 steps
    assert metric(url, "celeba_ddpm_sample_denoising_steps_total") - steps_at_close < 3000


def test_queue_full_gives_503_with_retry_after(tiny_weights):
    settings = Settings(weights=tiny_weights, max_batch=1, queue_size=1, warmup=False)
    with running(settings, app_hook=slow_steps(0.005)) as (url, _):  # the first still runs at the third
        long = {"n": 1, "seed": 1, "steps": 1000}
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(post, url, long)
            while metric(url, "celeba_ddpm_active_samples") < 1:
                time.sleep(0.01)
            second = ex.submit(post, url, long)
            while metric(url, "celeba_ddpm_queue_depth_requests") < 1:
                time.sleep(0.01)
            r = post(url, long)
            assert r.status_code == 503 and "queue full" in r.json()["detail"]
            assert int(r.headers["retry-after"]) >= 1
            assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "queue_full"}) == 1
            assert first.result().status_code == 200 and second.result().status_code == 200  # nothing accepted is lost


def test_api_key(tiny_weights):
    with running(Settings(weights=tiny_weights, api_key="s3cret", warmup=False)) as (url, _):
        body = {"n": 1, "steps": 2, "sampler": "ddim"}
        r = post(url, body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert post(url, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(url, body, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
        assert post(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200 and httpx.get(url + "/healthz").status_code == 200
        assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "unauthorized"}) == 3


def test_out_of_memory_fails_the_batch_and_keeps_serving(tiny_weights):
    def inject(app):
        engine = app.state.runtime.engine
        real = engine.step
        calls = {"n": 0}

        def flaky():
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real()
        engine.step = flaky

    with running(Settings(weights=tiny_weights, max_batch=8, warmup=False), app_hook=inject) as (url, _):
        r = post(url, {"n": 4, "seed": 1, "steps": 50, "sampler": "ddim"})
        assert r.status_code == 503 and "out of GPU memory" in r.json()["detail"] and "retry-after" in r.headers
        assert metric(url, "celeba_ddpm_out_of_memory_errors_total") == 1
        assert metric(url, "celeba_ddpm_batch_limit_samples") == 2
        assert httpx.get(url + "/v1/model").json()["max_batch"] == 2
        r = post(url, {"n": 4, "seed": 1, "steps": 50, "sampler": "ddim"})  # served in parts of 2
        assert r.status_code == 200 and len(r.json()["images"]) == 4


def _start_service(args, env=None):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--host", "127.0.0.1", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}"


def test_start_up_with_a_bad_weights_file_fails_clearly(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 100)
    proc, _ = _start_service([], env={"CELEBA_DDPM_WEIGHTS": str(bad)})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and str(bad) in out and "Traceback" not in out
    proc, _ = _start_service(["--weights", str(tmp_path / "missing.safetensors")])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "missing.safetensors: no such file" in out


def test_sigterm_stops_admission_and_finishes_in_flight_work(tiny_weights):
    proc, url = _start_service(["--weights", str(tiny_weights), "--shutdown-grace-s", "60"])
    try:
        wait_ready(url, proc)
        with ThreadPoolExecutor(1) as ex:
            inflight = ex.submit(post, url, {"n": 2, "seed": 1, "steps": 1000})
            while metric(url, "celeba_ddpm_active_samples") < 2:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                late = post(url, {"n": 1, "steps": 2, "sampler": "ddim"})
                assert late.status_code == 503
            except httpx.TransportError:
                pass  # the listener is already closed: also refused
            r = inflight.result(timeout=120)
            assert r.status_code == 200 and len(r.json()["images"]) == 2
        # uvicorn re-raises the signal after a clean shutdown, so the exit status is SIGTERM's
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        proc.kill()


def _drain_settings(tiny_weights, grace):
    return Settings(weights=tiny_weights, max_batch=4, warmup=False, shutdown_grace_s=grace)


def test_drain_in_process_refuses_new_work_and_finishes_in_flight_work(tiny_weights):
    """The project's own drain (SIGTERM calls it), with the listener still open: /readyz 503, a new request 503
    with Retry-After, the running request finishes; then work that outlives SHUTDOWN_GRACE_S gets 503."""
    # slowed steps: the requests must still be running at the drain, and the second outlive its 0.3 s grace
    with running(_drain_settings(tiny_weights, 60), app_hook=slow_steps(0.01)) as (url, app):
        rt = app.state.runtime
        with ThreadPoolExecutor(1) as ex:
            inflight = ex.submit(post, url, {"n": 2, "seed": 1, "steps": 300})
            while metric(url, "celeba_ddpm_active_samples") < 2:
                time.sleep(0.02)
            rt.drain()
            assert httpx.get(url + "/readyz").status_code == 503
            late = post(url, {"n": 1, "steps": 2, "sampler": "ddim"})
            assert late.status_code == 503 and "shutting down" in late.json()["detail"]
            assert int(late.headers["retry-after"]) >= 1
            assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "shutting_down"}) == 1
            r = inflight.result(timeout=120)
            assert r.status_code == 200 and len(r.json()["images"]) == 2
    with running(_drain_settings(tiny_weights, 0.3), app_hook=slow_steps(0.01)) as (url, app):
        with ThreadPoolExecutor(1) as ex:
            inflight = ex.submit(post, url, {"n": 1, "seed": 1, "steps": 1000})
            while metric(url, "celeba_ddpm_active_samples") < 1:
                time.sleep(0.02)
            app.state.runtime.drain()
            r = inflight.result(timeout=60)
            assert r.status_code == 503 and "shut down before this request finished" in r.json()["detail"]
            assert "retry-after" in r.headers
            assert metric(url, "celeba_ddpm_cancelled_requests_total", {"reason": "shutdown"}) == 1


def _device_fault_on_requests(app):
    """After warm-up, every step with a request in the batch hits a sticky CUDA error."""
    engine = app.state.runtime.engine
    real = engine.step

    def step():
        if any(isinstance(r.group, int) for r in engine.rows):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return real()
    engine.step = step


def test_a_device_fault_answers_everyone_and_reports_not_ready_and_not_alive(tiny_weights):
    with running(Settings(weights=tiny_weights, max_batch=1, warmup=False), app_hook=_device_fault_on_requests) \
            as (url, _):
        with ThreadPoolExecutor(2) as ex:
            rs = list(ex.map(lambda s: post(url, {"n": 1, "seed": s, "steps": 50}), [1, 2]))
        assert [r.status_code for r in rs] == [503, 503] and all("worker failed" in r.json()["detail"] for r in rs)
        assert httpx.get(url + "/readyz").status_code == 503
        assert httpx.get(url + "/healthz").status_code == 503
        r = post(url, {"n": 1, "steps": 2, "sampler": "ddim"})
        assert r.status_code == 503 and "retry-after" in r.headers


FAULTY_SERVICE = """
import sys, torch
from model.engine import SamplerEngine
real = SamplerEngine.step
def step(self):
    if any(isinstance(r.group, int) for r in self.rows):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return real(self)
SamplerEngine.step = step
from service.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_process_exits_non_zero_after_a_device_fault_so_it_is_restarted(tiny_weights):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_SERVICE, "--weights", str(tiny_weights), "--host",
                             "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        r = post(url, {"n": 1, "seed": 1, "steps": 20, "sampler": "ddim"})
        assert r.status_code == 503
        assert proc.wait(timeout=60) == 1
        assert "error: the denoising worker failed: AcceleratorError" in proc.stdout.read()
    finally:
        proc.kill()


def test_a_chunked_body_without_content_length_is_cut_off_at_the_limit(served):
    url, _ = served
    before = metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "body_too_large"})

    def chunks():  # no Content-Length: httpx sends Transfer-Encoding: chunked
        yield b'{"n": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(url + "/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "body_too_large"}) == before + 1


def test_request_timeout_setting_is_the_default_deadline(tiny_weights):
    # 5 ms more per step: the 1000-step chain outlasts 0.3 s however fast the CPU, 2 steps stay well within it
    settings = Settings(weights=tiny_weights, warmup=False, request_timeout_s=0.3)
    with running(settings, app_hook=slow_steps(0.005)) as (url, _):
        r = post(url, {"n": 1, "seed": 1, "steps": 1000})  # no deadline_s of its own
        assert r.status_code == 504 and "deadline" in r.json()["detail"]
        assert post(url, {"n": 1, "seed": 1, "steps": 2, "sampler": "ddim"}).status_code == 200


def test_every_histogram_the_readme_lists_is_observed(served):
    url, _ = served
    assert post(url, {"n": 2, "seed": 3, "steps": 4, "sampler": "ddim"}).status_code == 200
    readme = (ROOT / "README.md").read_text()
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    histograms = [name for name, f in families.items() if f.type == "histogram"]
    assert len(histograms) == 5
    for name in histograms:
        assert f"`{name.removeprefix('celeba_ddpm_')}`" in readme, name
        count = sum(s.value for s in families[name].samples if s.name == name + "_count")
        assert count > 0, f"{name} was never observed"


def test_the_echoed_random_seed_reproduces_the_image(served):
    url, _ = served
    first = post(url, {"n": 2, "steps": 5, "sampler": "ddim"}).json()
    again = post(url, {"n": 2, "steps": 5, "sampler": "ddim", "seed": first["seed"]}).json()
    assert again["seed"] == first["seed"]
    assert [im["png"] for im in again["images"]] == [im["png"] for im in first["images"]]


def test_help_lists_every_setting_with_its_description():
    from service.settings import Settings as S

    r = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    for name, field in S.model_fields.items():
        assert f"--{name.replace('_', '-')}" in r.stdout and f"CELEBA_DDPM_{name.upper()}" in r.stdout, name
        assert field.description and field.description.split(":")[0][:30] in " ".join(r.stdout.split()), name


def _poison_seed_13(app):
    """A faulty network: NaN for the sample of seed 13, from step 5 on; every other row is computed as usual."""
    engine = app.state.runtime.engine
    real = engine.runner
    calls = {"n": 0}

    def runner(x, t):
        out = real(x, t)
        calls["n"] += 1
        bad = engine.seeds == 13
        if calls["n"] >= 5 and bool(bad.any()):
            out = out.clone()
            out[bad] = float("nan")
        return out
    engine.runner = runner


def test_a_network_that_returns_nan_fails_only_the_affected_request(tiny_weights):
    with running(Settings(weights=tiny_weights, max_batch=8, warmup=False), app_hook=_poison_seed_13) as (url, _):
        with ThreadPoolExecutor(2) as ex:
            poisoned = ex.submit(post, url, {"n": 2, "seed": 12, "steps": 30, "sampler": "ddim"})
            healthy = ex.submit(post, url, {"n": 1, "seed": 20, "steps": 30, "sampler": "ddim"})
            bad, good = poisoned.result(), healthy.result()
        assert bad.status_code == 500 and "seed 13" in bad.json()["detail"] and "NaN" in bad.json()["detail"]
        assert good.status_code == 200
        assert nearly_equal(decode_png(good.json()["images"][0]["png"])[0],
                             offline(tiny_weights, [20], "ddim", 30)[0])  # its batch-mate finished correctly
        assert metric(url, "celeba_ddpm_non_finite_samples_total") == 1
        assert metric(url, "celeba_ddpm_active_samples") == 0  # the poisoned request's other row left too


def test_abusive_bodies_get_a_4xx_never_a_500(tiny_weights):
    with running(Settings(weights=tiny_weights, warmup=False, max_body_bytes=65536)) as (url, _):
        headers = {"content-type": "application/json"}
        cases = {"invalid UTF-8": b'{"n": 1, "seed": \xff\xfe}', "nested arrays": b"[" * 5000 + b"]" * 5000,
                 "nested objects": b'{"n": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
                 "not JSON": b"\x00\x01\x02", "empty": b""}
        for name, body in cases.items():
            r = httpx.post(url + "/generate", content=body, headers=headers)
            assert r.status_code == 422 and r.json()["detail"], (name, r.status_code, r.text)
        r = httpx.get(url + "/healthz", headers={"X-Padding": "a" * 60_000})
        assert r.status_code < 500
        assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "invalid"}) >= len(cases)


def test_rate_limits_per_key_answer_429_with_retry_after(tiny_weights):
    settings = Settings(weights=tiny_weights, warmup=False, api_keys="k1,k2", rate_limit_requests="3/minute",
                        rate_limit_images="5/minute")
    with running(settings) as (url, _):
        k1, k2 = ({"Authorization": f"Bearer {k}"} for k in ("k1", "k2"))
        body = {"n": 1, "steps": 2, "sampler": "ddim"}
        assert [post(url, body, headers=k1).status_code for _ in range(3)] == [200, 200, 200]
        r = post(url, body, headers=k1)  # the 4th request in a minute
        assert r.status_code == 429 and "rate limit" in r.json()["detail"] and 1 <= int(r.headers["retry-after"]) <= 60
        assert post(url, body, headers=k2).status_code == 200  # another key has its own budget
        assert post(url, {**body, "n": 5}, headers=k2).status_code == 429  # 1 + 5 images > 5 a minute
        assert post(url, {**body, "n": 4}, headers=k2).status_code == 200  # a refused request counted nothing
        r = httpx.post(url + "/v1/jobs", json=body, headers=k1)
        assert r.status_code == 429  # the jobs route shares the budget
        assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "rate_limited"}) == 3


def test_a_bad_rate_limit_setting_is_refused_at_start():
    r = subprocess.run([sys.executable, "-m", "service", "--rate-limit-requests", "10 per fortnight"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad setting" in r.stderr and "Traceback" not in r.stderr
