"""deploy/k8s, checked offline: both overlays' rendered manifests against the Kubernetes 1.32 API schemas
(kubernetes-validate, strict), the ScaledObject and ServiceMonitor against their vendored CRD schemas, every PromQL
expression through promtool, every metric and setting they name against what the service has, the router's nginx
config through `nginx -t`, and the facts a rolling update depends on. Never applied to a cluster here."""

import copy
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, tool
from service.settings import Settings
from service_helpers import exported_series

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ("gpu", "cpu")
CRDS = {("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
        ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml"}


def rendered(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / "rendered" / f"{overlay}.yaml").read_text()) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    """The one resource of that kind and name (a generated ConfigMap's name has a hash suffix)."""
    suffix = r"(-[a-z0-9]{10})?" if kind == "ConfigMap" else ""
    (doc,) = [d for d in docs if d["kind"] == kind and re.fullmatch(re.escape(name) + suffix, d["metadata"]["name"])]
    return doc


def settings_env(docs: list[dict]) -> dict[str, str]:
    return find(docs, "ConfigMap", "celeba-ddpm-settings")["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rendered_files_are_what_kustomize_renders_now(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # not in Debian's archive; the committed renderings are still validated below
        pytest.skip("kubectl not installed: cannot re-render deploy/k8s/overlays (run deploy/k8s/render.sh)")
    fresh = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    committed = (K8S / "rendered" / f"{overlay}.yaml").read_text()
    assert committed.split("\n", 1)[1] == fresh, "deploy/k8s/rendered is stale: run deploy/k8s/render.sh"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_in_resources_pass_strict_validation(overlay):
    docs = rendered(overlay) + [yaml.safe_load((K8S / "api-keys.example.yaml").read_text())]
    kinds = set()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error
        kinds.add(doc["kind"])
    assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds
    assert ("HorizontalPodAutoscaler" in kinds) == (overlay == "cpu")


def strict(schema: dict) -> dict:
    """A CRD schema as the API server's strict field validation reads it: unknown fields are errors, except under
    x-kubernetes-preserve-unknown-fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


def crd_schema(api_version: str, kind: str) -> dict:
    crd = yaml.safe_load((K8S / "crds" / CRDS[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{kind} {version} is no longer served by this CRD"
    schema = strict(v["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
    return schema


def test_custom_resources_match_their_crd_schemas():
    checked = set()
    for overlay in OVERLAYS:
        for doc in rendered(overlay):
            if (doc["apiVersion"], doc["kind"]) in CRDS:
                jsonschema.validate(doc, crd_schema(doc["apiVersion"], doc["kind"]))
                checked.add(doc["kind"])
    assert checked == {"ScaledObject", "ServiceMonitor"}
    # the strict reading catches a misspelt field, which the CRD alone would let through
    so = find(rendered("gpu"), "ScaledObject", "celeba-ddpm")
    so["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(so, crd_schema(so["apiVersion"], so["kind"]))


def promql_expressions() -> dict[str, str]:
    """Every PromQL expression in deploy/k8s, with prometheus-adapter's template fields filled in."""
    out = {}
    so = find(rendered("gpu"), "ScaledObject", "celeba-ddpm")
    for i, trigger in enumerate(so["spec"]["triggers"]):
        out[f"keda_trigger_{i}"] = trigger["metadata"]["query"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    for i, rule in enumerate(adapter["rules"]["custom"]):
        fill = {"<<.LabelMatchers>>": 'namespace="celeba-ddpm",pod=~"a|b"', "<<.GroupBy>>": "pod",
                "<<.Series>>": rule["seriesQuery"].split("{")[0]}
        expr = rule["metricsQuery"]
        for k, v in fill.items():
            expr = expr.replace(k, v)
        out[f"adapter_rule_{i}"] = expr
        out[f"adapter_series_{i}"] = rule["seriesQuery"]
    return out


def test_every_promql_expression_parses_and_names_only_exported_metrics(tmp_path):
    promtool = tool("promtool", "prometheus")
    exprs = promql_expressions()
    rules = {"groups": [{"name": "deploy-k8s", "rules": [{"record": f"check:{k}", "expr": e}
                                                         for k, e in exprs.items()]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    used = {m for e in exprs.values() for m in re.findall(r"\bceleba_ddpm_\w+", e)}
    exported = exported_series()
    assert used and used <= exported, used - exported
    assert {"celeba_ddpm_queued_samples", "celeba_ddpm_active_samples"} <= used


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_and_the_autoscaling_target_is_the_batch_size(overlay):
    docs = rendered(overlay)
    env = settings_env(docs)
    for key, value in env.items():
        assert key.startswith("CELEBA_DDPM_") and key[12:].lower() in Settings.model_fields, key
    Settings(**{k[12:].lower(): v for k, v in env.items() if k != "CELEBA_DDPM_API_KEYS_FILE"})  # valid values
    target = {"gpu": lambda: find(docs, "ScaledObject", "celeba-ddpm")["spec"]["triggers"][0]["metadata"]["threshold"],
              "cpu": lambda: find(docs, "HorizontalPodAutoscaler", "celeba-ddpm")["spec"]["metrics"][0]["pods"]
              ["target"]["averageValue"]}[overlay]()
    assert int(target) == int(env["CELEBA_DDPM_MAX_BATCH"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_drains_before_it_is_killed_and_runs_locked_down(overlay):
    docs = rendered(overlay)
    dep = find(docs, "Deployment", "celeba-ddpm")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = float(settings_env(docs)["CELEBA_DDPM_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5 + 5  # + uvicorn's 5 s + margin
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # weights + warm-up
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    sc, psc = c["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) == (overlay == "gpu")
    if overlay == "gpu":
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # every container of every pod is locked down the same way (the router too)
    for d in [x for x in docs if x["kind"] == "Deployment"]:
        for cont in d["spec"]["template"]["spec"]["containers"]:
            assert cont["securityContext"]["readOnlyRootFilesystem"] and "limits" in cont["resources"]


def test_a_pod_ip_becomes_a_replica_name_the_router_routes_to(tmp_path):
    """The Deployment's command turns POD_IP into the REPLICA setting; the router's map sends that job's
    requests to the pod's name in the celeba-ddpm-replicas Service."""
    docs = rendered("gpu")
    (c,) = find(docs, "Deployment", "celeba-ddpm")["spec"]["template"]["spec"]["containers"]
    command = c["command"][:-1] + [c["command"][-1].replace("exec python -m service", "printenv CELEBA_DDPM_REPLICA")]
    replica = subprocess.run(command, env={"POD_IP": "10.244.3.17", "PATH": "/usr/bin:/bin"}, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
    assert replica == "10-244-3-17" and Settings(replica=replica).replica == replica
    template = find(docs, "ConfigMap", "celeba-ddpm-router")["data"]["router.conf.template"]
    pattern = re.search(r'"~(\^/v1/jobs/.*?)"\s', template)[1].replace("(?<", "(?P<")  # PCRE to Python
    m = re.match(pattern, f"/v1/jobs/{replica}.AbC-12_x/events")
    assert m and m["replica"] == replica
    assert not re.match(pattern, "/v1/jobs/evil.example.com.AbC/events")  # only pod names, never any host


def test_the_router_config_passes_nginx_t(tmp_path):
    nginx = tool("nginx", "nginx")
    template = (K8S / "base" / "router.conf.template").read_text()
    values = {"POD_NAMESPACE": "celeba-ddpm", "CLUSTER_DOMAIN": "cluster.local", "NGINX_LOCAL_RESOLVERS": "127.0.0.1"}
    server = re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], template)  # what the image's envsubst step does
    assert "${" not in server
    (tmp_path / "router.conf").write_text(server.replace("listen 8080;", "listen 127.0.0.1:8080;")
                                          .replace("access_log /dev/stdout upstream;", "access_log off;"))
    temp = "".join(f"{k}_temp_path {tmp_path}/{k}; " for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(f"events {{}}\nhttp {{ {temp}\ninclude {tmp_path}/router.conf; }}\n")
    r = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e",
                        str(tmp_path / "error.log"), "-g", f"pid {tmp_path}/nginx.pid;"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "test is successful" in r.stderr, r.stderr
