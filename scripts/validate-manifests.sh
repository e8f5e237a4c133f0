#!/usr/bin/env bash
# Renders every kustomization under manifests/ with a real kustomize and validates every
# rendered object against the Kubernetes OpenAPI schemas, strictly (unknown fields are errors),
# then checks what the schemas cannot (scripts/check-manifests.py).
#
# kustomize: the one built into kubectl (`kubectl kustomize`, kustomize v5) if present,
# else a standalone `kustomize` binary. Neither is downloaded here; without both this fails.
# Schemas: the PyPI package kubernetes-validate (installed with pip if missing), which bundles
# the OpenAPI schemas of each Kubernetes release.
#
# Usage: scripts/validate-manifests.sh [KUBERNETES_VERSION]   (default 1.33.0)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
k8s_version=${1:-1.33.0}
kustomizations=(
    overlays/nftables overlays/iptables overlays/ebpf
    rollback/nftables rollback/iptables rollback/ebpf
    cleanup-kube-proxy
)

if kubectl kustomize --help >/dev/null 2>&1; then
    render() { kubectl kustomize "$1"; }
    echo "validate-manifests: kustomize: $(kubectl version --client 2>/dev/null | grep -i kustomize || echo 'kubectl kustomize')"
elif command -v kustomize >/dev/null 2>&1; then
    render() { kustomize build "$1"; }
    echo "validate-manifests: kustomize: $(kustomize version)"
else
    echo "validate-manifests: neither 'kubectl kustomize' nor 'kustomize' is available" >&2
    exit 1
fi

if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    echo "validate-manifests: installing kubernetes-validate from PyPI"
    python3 -m pip install --quiet kubernetes-validate
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for k in "${kustomizations[@]}"; do
    f="$out/$(echo "$k" | tr / -).yaml"
    render "$root/manifests/$k" > "$f"
    # One document per object, so that a failure names the object.
    python3 - "$f" "$out/split-$(basename "$f" .yaml)" <<'PY'
import os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
docs = [d for d in yaml.safe_load_all(open(src)) if d]
if not docs:
    sys.exit(f"{src}: rendered nothing")
for i, d in enumerate(docs):
    name = f"{i:02d}-{d['kind']}-{d['metadata']['name']}.yaml"
    with open(os.path.join(dst, name), "w") as fh:
        yaml.safe_dump(d, fh)
PY
    n=$(ls "$out/split-$(basename "$f" .yaml)" | wc -l)
    python3 -m kubernetes_validate --strict --quiet -k "$k8s_version" "$out/split-$(basename "$f" .yaml)"/*.yaml
    echo "validate-manifests: $k: $n objects valid against Kubernetes $k8s_version (strict)"
done

python3 "$root/scripts/check-manifests.py" "$root/manifests" "$out"/*.yaml
echo "validate-manifests: ok"
