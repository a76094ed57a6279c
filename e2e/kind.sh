#!/usr/bin/env bash
# make e2e-kind: a kind cluster `custos-e2e` with the Custos image and chart, then make e2e.
# Needs docker, kind and kubectl on PATH. Keeps the cluster (delete: kind delete cluster --name custos-e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CUSTOS_E2E_CLUSTER:-custos-e2e}
IMAGE=custos:e2e
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "make e2e-kind needs $tool on PATH" >&2; exit 2; }
done
if ! kind get clusters | grep -qx "$CLUSTER"; then
  echo "==> creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 120s
fi
export KUBECONFIG="${KUBECONFIG:-$HOME/.kube/config}"
kubectl config use-context "kind-$CLUSTER" >/dev/null
echo "==> building and loading $IMAGE"
make image IMAGE="$IMAGE"
kind load docker-image "$IMAGE" --name "$CLUSTER"
echo "==> installing the chart"
bash scripts/install-helm.sh
target/tools/helm upgrade --install custos charts/custos -n custos-system --create-namespace \
  --set image.repository=custos --set image.tag=e2e --set image.pullPolicy=Never --wait --timeout 5m
kubectl -n custos-system rollout status deployment/custos-operator --timeout=180s
echo "==> scenarios"
make e2e
