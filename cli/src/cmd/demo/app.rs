//! The synthetic services behind the sidecars: one small HTTP/1.1 server per protected service
//! on 127.0.0.1 (any free port), answering JSON from the [`Dataset`]. They do no access control
//! of their own: that is the sidecar's job.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::data::{BRANCHES, Dataset};

/// The protected services, one per example policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Service {
    /// customer-api (logistics): courier-branch-scoping.yaml.
    CustomerApi,
    /// waybill-api (logistics, Audit mode): audit-mode-rollout.yaml.
    WaybillApi,
    /// member-admin (backoffice): backoffice-bulk-export.yaml.
    MemberAdmin,
    /// pickup-search (storefront): storefront-crawler-quotas.yaml.
    PickupSearch,
    /// parcel-scan (scanning): scanner-egress-lockdown.yaml.
    ParcelScan,
}

impl Service {
    /// Every service.
    pub(crate) const ALL: [Service; 5] = [
        Service::CustomerApi,
        Service::WaybillApi,
        Service::MemberAdmin,
        Service::PickupSearch,
        Service::ParcelScan,
    ];

    /// The `app` label of its pods (the policy's selector).
    pub(crate) fn app(self) -> &'static str {
        match self {
            Service::CustomerApi => "customer-api",
            Service::WaybillApi => "waybill-api",
            Service::MemberAdmin => "member-admin",
            Service::PickupSearch => "pickup-search",
            Service::ParcelScan => "parcel-scan",
        }
    }

    /// Its namespace.
    pub(crate) fn namespace(self) -> &'static str {
        match self {
            Service::CustomerApi | Service::WaybillApi => "logistics",
            Service::MemberAdmin => "backoffice",
            Service::PickupSearch => "storefront",
            Service::ParcelScan => "scanning",
        }
    }
}

/// The running services; stopped when dropped.
pub(crate) struct Apps {
    addrs: BTreeMap<Service, SocketAddr>,
    _tasks: JoinSet<()>,
}

/// Path of the storefront identity provider's JWKS, served by the pickup-search app's server
/// (the sidecars fetch it directly, as they would fetch the real `jwksUri`).
pub(crate) const JWKS_PATH: &str = "/.well-known/jwks.json";

impl Apps {
    /// Starts one server per service.
    pub(crate) async fn start(data: Arc<Dataset>, jwks: String) -> anyhow::Result<Apps> {
        let mut tasks = JoinSet::new();
        let mut addrs = BTreeMap::new();
        let jwks = Arc::new(jwks);
        for service in Service::ALL {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
            addrs.insert(service, listener.local_addr()?);
            tasks.spawn(serve(listener, service, data.clone(), jwks.clone()));
        }
        Ok(Apps { addrs, _tasks: tasks })
    }

    /// Where a service listens.
    pub(crate) fn addr(&self, service: Service) -> SocketAddr {
        self.addrs.get(&service).copied().unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

async fn serve(listener: TcpListener, service: Service, data: Arc<Dataset>, jwks: Arc<String>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let (data, jwks) = (data.clone(), jwks.clone());
        let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
            let (data, jwks) = (data.clone(), jwks.clone());
            async move { Ok::<_, Infallible>(handle(service, &data, &jwks, request).await) }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn handle(
    service: Service,
    data: &Dataset,
    jwks: &str,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    // Drain the request body (scan receipts carry one).
    let _ = body.collect().await;
    if service == Service::PickupSearch && parts.uri.path() == JWKS_PATH {
        return reply(StatusCode::OK, jwks.as_bytes().to_vec());
    }
    let query = parse_query(parts.uri.query().unwrap_or_default());
    let segments: Vec<&str> = parts.uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let answer = match service {
        Service::CustomerApi | Service::WaybillApi => customer_api(data, &parts.method, &segments, &query),
        Service::MemberAdmin => member_admin(data, &parts.method, &segments, &query),
        Service::PickupSearch => pickup_search(data, &parts.method, &segments, &query),
        Service::ParcelScan => parcel_scan(data, &parts.method, &segments),
    };
    match answer {
        Some(value) => reply(StatusCode::OK, value.to_string().into_bytes()),
        None => reply(StatusCode::NOT_FOUND, br#"{"error":"not found"}"#.to_vec()),
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

/// `a=1&b=2` into a map (the demo's queries need no percent-decoding).
fn parse_query(query: &str) -> BTreeMap<&str, &str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).collect()
}

fn number(query: &BTreeMap<&str, &str>, name: &str, default: usize) -> usize {
    query.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// customer-api and waybill-api: customers, parcels by id, parcel lists (optionally of one
/// branch), a customer's parcels.
fn customer_api(
    data: &Dataset,
    method: &Method,
    path: &[&str],
    query: &BTreeMap<&str, &str>,
) -> Option<Value> {
    if method != Method::GET {
        return None;
    }
    match path {
        ["customers", id] => data.customer(id),
        ["customers", id, "parcels"] => {
            let items: Vec<Value> = data
                .parcels
                .iter()
                .filter(|p| p["customer"] == *id)
                .filter_map(|p| p["id"].as_str())
                .filter_map(|p| data.parcel(p))
                .collect();
            Some(json!({"items": items, "nextPage": null}))
        }
        ["parcels"] | ["parcels", "search"] => {
            let branch = query.get("branch").filter(|b| BRANCHES.contains(b));
            let (page, size) = (number(query, "page", 0), number(query, "size", 40).min(200));
            // Pages wrap around: the demo's 400 parcels stand for a much longer list.
            let items: Vec<Value> = data
                .parcels
                .iter()
                .filter(|p| branch.is_none_or(|b| p["branch"] == **b))
                .cycle()
                .skip(page * size)
                .take(size)
                .filter_map(|p| p["id"].as_str().and_then(|id| data.parcel(id)))
                .collect();
            Some(json!({"items": items, "nextPage": page + 1}))
        }
        ["parcels", id, ..] => data.parcel(id),
        _ => None,
    }
}

/// member-admin: the customer list and search, single customers, and the export, dump and
/// report endpoints a back office typically has.
fn member_admin(
    data: &Dataset,
    method: &Method,
    path: &[&str],
    query: &BTreeMap<&str, &str>,
) -> Option<Value> {
    let all = || json!({"items": data.member_page(0, data.customers.len()), "total": data.customers.len()});
    match (method, path) {
        (&Method::GET, ["customers"] | ["customers", "search"]) => {
            let (page, size) = (number(query, "page", 0), number(query, "size", 20).min(500));
            Some(json!({"items": data.member_page(page, size), "total": data.customers.len()}))
        }
        (_, ["customers", "export", ..] | ["users", "dump"])
        | (&Method::POST, ["reports", _, "download"]) => Some(all()),
        (&Method::GET, ["customers", id]) => data.member(id),
        _ => None,
    }
}

/// pickup-search: paged search results and single pickup points.
fn pickup_search(
    data: &Dataset,
    method: &Method,
    path: &[&str],
    query: &BTreeMap<&str, &str>,
) -> Option<Value> {
    if method != Method::GET {
        return None;
    }
    match path {
        ["search", ..] => {
            let (page, size) = (number(query, "page", 0), number(query, "size", 40).min(200));
            let items: Vec<Value> =
                data.pickup_points.iter().cycle().skip(page * size).take(size).cloned().collect();
            Some(json!({"items": items, "page": page}))
        }
        ["points", id] => data.pickup_points.iter().find(|p| p["id"] == *id).cloned(),
        _ => None,
    }
}

/// parcel-scan: parcel look-ups, scan receipts, and list endpoints the scanners never need.
fn parcel_scan(data: &Dataset, method: &Method, path: &[&str]) -> Option<Value> {
    match (method, path) {
        (&Method::GET, ["parcels"] | ["customers"]) => {
            let items: Vec<Value> = data
                .parcels
                .iter()
                .filter_map(|p| p["id"].as_str())
                .filter_map(|id| data.scan_view(id))
                .collect();
            Some(json!({ "items": items }))
        }
        (&Method::GET, ["parcels", id] | ["parcels", id, _]) => data.scan_view(id),
        (&Method::POST, ["parcels", id, "scans"]) => Some(json!({
            "id": format!("SC-{}", id.trim_start_matches("SP")),
            "parcelId": id,
            "depot": "HB-07",
            "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })),
        _ => None,
    }
}
