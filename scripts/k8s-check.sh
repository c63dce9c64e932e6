#!/usr/bin/env bash
# Validates deploy/kubernetes offline (issue 21): renders the base and every
# overlay with `kubectl kustomize`, checks the core kinds with
# kubernetes-validate's bundled schemas (strict, Kubernetes 1.32), the KEDA
# objects with deploy/kubernetes/schemas/, every environment variable name
# against the settings the binaries accept (derived from common/src/settings),
# and the deployment shape (probes, requests, PDBs, grace periods, HPA, one
# ScaledObject per queue). Then it breaks copies of the tree in a temp dir and
# requires each fault to be caught. Exit 0 only when all of that holds.
#
# Needs kubectl (Debian: `apt-get install kubectl`, or any kubectl ≥ 1.27 with
# its built-in kustomize) and python3 ≥ 3.11; the Python packages are pinned
# below and installed once into a venv under the target dir.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s%N)

if ! command -v kubectl >/dev/null; then
    echo "k8s-check: kubectl not found (apt-get install kubectl)" >&2
    exit 1
fi
venv="${CARGO_TARGET_DIR:-target}/k8s-venv"
pins=(kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4)
stamp="$venv/.pins"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
    echo "${pins[*]}" > "$stamp"
fi

status=0
"$venv/bin/python" scripts/k8s-check.py "$@" || status=$?
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "k8s-check: $((elapsed_ms / 1000)).$((elapsed_ms % 1000 / 100)) s"
exit "$status"
