#!/usr/bin/env bash
# make demo (interim): replays the four incidents of DESIGN.md against the example policies
# with `custos explain`, on synthetic data, and prints what Custos decides and does to each
# response. The full demo with live sidecar, collector and alerts replaces this with the
# "Ship it" issue.
set -euo pipefail
cd "$(dirname "$0")/.."
CUSTOS=${CUSTOS:-target/debug/custos}
[ -x "$CUSTOS" ] || cargo build -q -p custos

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
step() { printf '\n$ custos %s\n' "$*"; }
run() { step "$*"; "$CUSTOS" "$@"; }
explain() { step "explain $*"; "$CUSTOS" explain "$@"; }

bold "0. Every example policy is valid (custos check)"
run check examples/*.yaml

bold "1. Courier insiders (YTO Express 2020): a clerk of branch HB-07 lists parcels"
explain -p examples/courier-branch-scoping.yaml --request 'GET /parcels/search' \
  --user branch=HB-07,role=clerk --user-id clerk-hb07-1 --from logistics/ops-portal \
  --body examples/data/parcel-page.json
echo "  -> the SH-02 parcel is removed (out of the clerk's branch), phones and names masked."
explain -p examples/courier-branch-scoping.yaml --request 'GET /parcels/search' \
  --user branch=HB-07,role=clerk --from logistics/billing
echo "  -> a rented account used from another workload gets nothing."

bold "2. Back-office bulk download (Alipay 2010)"
explain -p examples/backoffice-bulk-export.yaml --request 'GET /customers/export' \
  --user role=support-agent --from backoffice/admin-console --time 2026-11-23T10:00:00Z
explain -p examples/backoffice-bulk-export.yaml --request 'GET /customers/./export/../export' \
  --user role=support-agent --from backoffice/admin-console --time 2026-11-23T10:00:00Z
explain -p examples/backoffice-bulk-export.yaml --request 'GET /customers%2fexport' \
  --user role=support-agent --from backoffice/admin-console --time 2026-11-23T10:00:00Z
explain -p examples/backoffice-bulk-export.yaml --request 'GET /customers?page=1' \
  --user role=support-agent --from backoffice/admin-console --time 2026-11-23T10:00:00Z \
  --body examples/data/member-export-page.json
echo "  -> a 120-record page is over maxRecordsPerResponse (100, onExceed: Deny): refused."
explain -p examples/backoffice-bulk-export.yaml --request 'GET /customers/M100007' \
  --user role=support-agent --from backoffice/admin-console --time 2026-11-23T23:30:00Z
echo "  -> the back office is closed at 23:30 UTC (a CEL 'when' on a Deny rule)."

bold "3. Crawler (Taobao 2020): pickup-point search"
explain -p examples/storefront-crawler-quotas.yaml --request 'GET /search?city=Hangzhou' \
  --from storefront/storefront-bff
echo "  -> anonymous scraping is refused."
explain -p examples/storefront-crawler-quotas.yaml --request 'GET /search?city=Hangzhou' \
  --user tier=basic --user-id shopper-1 --from storefront/storefront-bff \
  --body examples/data/pickup-search-results.json
echo "  -> signed-in users get at most 20 records a page, contact phones redacted;"
echo "     60 requests/min, 500 records/hour, 2000/day per user (enforced by the sidecar)."

bold "4. Infected scanners (Cainiao 2018): a depot scanner looks up a parcel"
explain -p examples/scanner-egress-lockdown.yaml --request 'GET /parcels/SP20240077' \
  --user depot=HZ-1 --user-id scanner-0042 --from scanning/scanner-gateway \
  --body examples/data/parcel.json
echo "  -> scanners see the last 4 digits only; addresses are removed."
step "compile -n scanning examples/scanner-egress-lockdown.yaml --network-policies - (egress part)"
"$CUSTOS" compile -n scanning examples/scanner-egress-lockdown.yaml -o /dev/null --network-policies - 2>/dev/null \
  | sed -n '/egress:/,/ingress:/p' | head -40
echo "  -> egress locked down to DNS, the collector and parcel-db:5432."

bold "5. A broken policy is caught before it ships"
step "check examples/broken/broken-rowfilter.yaml"
"$CUSTOS" check examples/broken/broken-rowfilter.yaml || echo "  (exit $?: as expected)"

bold "Demo finished."
