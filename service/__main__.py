"""`python -m service`: serve faces on port 8000 with the weights shipped in weights/ (flags override env vars).

Thread policy is set here, before torch starts OpenMP: OMP_WAIT_POLICY=PASSIVE (threads sleep instead of
spinning between ops). Measured in bench/results/thread-policy-cpu.md: spinning is up to 1.6x faster on idle
cores but 3.7-26x slower beside another busy process; PASSIVE stays within 1.5x. Set the variable to override.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import uvicorn  # noqa: E402

from model.device import pick_device  # noqa: E402
from model.weights import WeightsError, load_weights  # noqa: E402

from .app import create_app  # noqa: E402
from .limits import RateLimits  # noqa: E402
from .settings import Settings  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in Settings.model_fields.items():  # one flag per setting, described where it is defined
        default = field.default.get_secret_value() if hasattr(field.default, "get_secret_value") else field.default
        shown = "unset" if default is None else default
        p.add_argument("--" + name.replace("_", "-"), default=None, metavar=name.upper(),
                       help=f"{field.description or ''} (env CELEBA_DDPM_{name.upper()}; default: {shown})"
                       .replace("%", "%%"))  # argparse formats help with %
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        given = {k: v for k, v in vars(a).items() if k in Settings.model_fields and v is not None}
        settings = Settings(**given)
        settings.keys()  # a missing keys file is a bad setting, said now
        RateLimits(settings.rate_limit_requests, settings.rate_limit_images)  # and so is '10 per fortnight'
    except ValueError as e:
        print(f"error: bad setting: {e}", file=sys.stderr)
        return 2
    try:
        device = pick_device(settings.device)  # fail fast on a device this machine lacks (cuda:7 on a 1-GPU host)
    except ValueError as e:
        print(f"error: bad setting: device: {e}", file=sys.stderr)
        return 2
    try:
        weights = load_weights(settings.weights_path(device))  # fail fast, before binding the port
    except WeightsError as e:
        print(f"error: cannot load weights: {e}", file=sys.stderr)
        return 2
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        # The denoising worker died (a device fault): every request has been answered with 503 and /readyz and
        # /healthz say 503. Exit non-zero so that the orchestrator (Docker, Kubernetes) restarts the process.
        failed.append(exc)
        server.should_exit = True

    app = create_app(settings, weights, on_fatal)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM/SIGINT: stop admitting at once; in-flight work gets shutdown_grace_s to finish.
            rt = getattr(app.state, "runtime", None)
            if rt is not None:
                rt.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=a.log_level,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
                            limit_concurrency=settings.limit_concurrency,
                            timeout_keep_alive=settings.timeout_keep_alive,
                            forwarded_allow_ips=settings.forwarded_allow_ips)
    server = Server(config)
    server.run()
    if failed:
        print(f"error: the denoising worker failed: {type(failed[0]).__name__}: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
