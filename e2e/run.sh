#!/usr/bin/env bash
# kvcache end to end on a real Kubernetes cluster (kind): the image built from this checkout,
# the Helm chart installed, then e2e/test_kind.py against it.
#
#   e2e/run.sh          up, test, down (KEEP_CLUSTER=1 keeps the cluster to look around)
#   e2e/run.sh up       create the kind cluster, build and load the image, install the chart
#   e2e/run.sh test     run e2e/test_kind.py against a cluster that is up
#   e2e/run.sh down     delete the kind cluster
#
# Needs a running Docker daemon, and docker, kind, kubectl and helm on PATH. The Python side
# (PYTHON, default .venv/bin/python) needs this package installed (`make setup`).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${KVCACHE_E2E_CLUSTER:-kvcache-e2e}"
CONTEXT="kind-$CLUSTER"
TAG="e2e"
PYTHON="${PYTHON:-.venv/bin/python}"

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "e2e: $tool is not on PATH" >&2; exit 2; }
  done
  docker info >/dev/null 2>&1 || { echo "e2e: the Docker daemon is not reachable" >&2; exit 2; }
}

up() {
  need docker kind kubectl helm
  kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
  docker build -t "kvcache:$TAG" .
  kind load docker-image "kvcache:$TAG" --name "$CLUSTER"
  # pullPolicy Never: the image exists only inside the kind nodes. The operator gives the cache
  # nodes the same image, whose tag is not `latest`, so the kubelet does not pull it either.
  helm upgrade --install kvcache charts/kvcache --kube-context "$CONTEXT" \
    --namespace kvcache-system --create-namespace \
    --set image.repository=kvcache --set image.tag="$TAG" --set image.pullPolicy=Never \
    --wait --timeout 5m
}

down() {
  kind delete cluster --name "$CLUSTER"
}

run_tests() {
  KVCACHE_E2E_READY=1 KVCACHE_E2E_CLUSTER="$CLUSTER" \
    "$PYTHON" -m pytest e2e/test_kind.py -v -rs -p no:cacheprovider
}

case "${1:-all}" in
  up) up ;;
  test) run_tests ;;
  down) down ;;
  all)
    need docker kind kubectl helm
    trap '[ "${KEEP_CLUSTER:-0}" = 1 ] || down' EXIT
    up
    run_tests
    ;;
  *) echo "usage: e2e/run.sh [up|test|down|all]" >&2; exit 2 ;;
esac
