//! The mesh's reading of the proxy port. Where a mesh's proxy sits in front of the Custos
//! sidecar and the sidecar takes the caller from the mesh's identity header
//! (`--caller-identity istio`: `x-forwarded-client-cert`; `linkerd`: `l5d-client-id`), the mesh
//! must read the proxy port as HTTP, which is when it sets that header from the client
//! certificate it verified and removes the caller's own. A port it forwards as opaque bytes
//! passes the caller's header through: any caller could name itself any workload. Without a
//! mesh identity, every caller behind such a port is the mesh proxy's, anonymous. Declared by:
//!
//! - a Service of the namespace selecting protected pods, whose port targets the proxy port
//!   (by number, by the sidecar's port name, or by a name a protected pod gives it), with an
//!   `appProtocol` or a port name (`<protocol>` or `<protocol>-<suffix>`, Istio's protocol
//!   selection) naming a protocol Istio forwards without reading HTTP: `tcp`, `tls`, `https`
//!   (passed through encrypted), `mongo`, `mysql`, `redis`;
//! - Linkerd's `config.linkerd.io/opaque-ports` annotation, on a protected pod or on such a
//!   Service, listing the proxy port (a number, a range `a-b`, or a port name).

use custos_api::policy::DataAccessPolicySpec;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pods;
use crate::inject::PROXY_PORT_NAME;

/// Linkerd's annotation for ports its proxy forwards without protocol detection.
pub const LINKERD_OPAQUE_PORTS: &str = "config.linkerd.io/opaque-ports";

/// Protocols Istio forwards without reading HTTP (its protocol selection by `appProtocol` or
/// port name prefix).
const ISTIO_OPAQUE_PROTOCOLS: [&str; 6] = ["tcp", "tls", "https", "mongo", "mysql", "redis"];

/// Pods named in a finding; the rest are counted.
const PODS_NAMED: usize = 3;

/// What declares the proxy port of the policy's pods as not HTTP, one sentence each, sorted.
///
/// The protected pods are `selected` (the running pods the workload selector matches); while
/// there are none, the selector's `matchLabels` stand for them.
pub(crate) fn non_http_declarations(
    namespace: &str,
    spec: &DataAccessPolicySpec,
    selected: &[&Pod],
    services: &[Service],
) -> Vec<String> {
    let proxy_port = i32::from(spec.workload.proxy_port());
    let stand_in = spec.workload.selector.match_labels.clone().unwrap_or_default();
    let mut found = Vec::new();
    for service in
        services.iter().filter(|s| s.metadata.namespace.as_deref().is_none_or(|ns| ns == namespace))
    {
        let Some(service_spec) = &service.spec else { continue };
        // A Service without a selector (endpoints managed by hand) is not matched to pods.
        let Some(selector) = service_spec.selector.as_ref().filter(|s| !s.is_empty()) else { continue };
        let selects = |labels: &std::collections::BTreeMap<String, String>| {
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        };
        let targets: Vec<&Pod> = selected.iter().copied().filter(|p| selects(pods::labels(p))).collect();
        if targets.is_empty() && !(selected.is_empty() && selects(&stand_in)) {
            continue;
        }
        let name = service.metadata.name.as_deref().unwrap_or_default();
        for port in service_spec.ports.iter().flatten() {
            if !targets_proxy_port(port, proxy_port, &targets) {
                continue;
            }
            let label = port.name.clone().unwrap_or_else(|| port.port.to_string());
            if let Some(protocol) = istio_opaque_protocol(port) {
                found.push(format!(
                    "Service {name} port {label} targets the proxy port as {protocol} (Istio forwards it \
                     without reading HTTP): name it http-* or set appProtocol: http"
                ));
            }
        }
        let opaque = service.metadata.annotations.as_ref().and_then(|a| a.get(LINKERD_OPAQUE_PORTS));
        let service_ports: Vec<i32> = service_spec
            .ports
            .iter()
            .flatten()
            .filter(|p| targets_proxy_port(p, proxy_port, &targets))
            .map(|p| p.port)
            .collect();
        if let Some(list) = opaque
            && service_ports.iter().any(|p| lists_port(list, *p, |_| None))
        {
            found.push(format!(
                "Service {name} lists the port of the proxy port in {LINKERD_OPAQUE_PORTS} (Linkerd forwards it \
                 opaque): remove it from the annotation"
            ));
        }
    }
    let opaque_pods: Vec<&str> = selected
        .iter()
        .filter(|p| {
            p.metadata.annotations.as_ref().and_then(|a| a.get(LINKERD_OPAQUE_PORTS)).is_some_and(|list| {
                lists_port(list, proxy_port, |name| {
                    if name == PROXY_PORT_NAME { Some(proxy_port) } else { pods::named_port(p, name) }
                })
            })
        })
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    if !opaque_pods.is_empty() {
        let mut names = opaque_pods.iter().take(PODS_NAMED).copied().collect::<Vec<_>>().join(", ");
        if opaque_pods.len() > PODS_NAMED {
            names.push_str(&format!(" and {} more", opaque_pods.len() - PODS_NAMED));
        }
        found.push(format!(
            "pods {names} list the proxy port {proxy_port} in {LINKERD_OPAQUE_PORTS} (Linkerd forwards it \
             opaque): remove it from the annotation"
        ));
    }
    found.sort();
    found
}

/// Whether `port` of a Service sends to the proxy port of the pods `targets` (or, with none
/// to resolve a name on, to the sidecar's port name).
fn targets_proxy_port(port: &ServicePort, proxy_port: i32, targets: &[&Pod]) -> bool {
    if port.protocol.as_deref().is_some_and(|p| !p.eq_ignore_ascii_case("TCP")) {
        return false;
    }
    match &port.target_port {
        None => port.port == proxy_port,
        Some(IntOrString::Int(n)) => *n == proxy_port,
        Some(IntOrString::String(name)) => {
            name == PROXY_PORT_NAME || targets.iter().any(|p| pods::named_port(p, name) == Some(proxy_port))
        }
    }
}

/// The protocol Istio would forward `port` as without reading HTTP, if any: its
/// `appProtocol`, else the port name's prefix.
fn istio_opaque_protocol(port: &ServicePort) -> Option<String> {
    let declared = match &port.app_protocol {
        Some(app) => app.to_ascii_lowercase(),
        None => {
            let name = port.name.as_deref()?.to_ascii_lowercase();
            name.split_once('-').map_or(name.clone(), |(prefix, _)| prefix.to_string())
        }
    };
    ISTIO_OPAQUE_PROTOCOLS.contains(&declared.as_str()).then_some(declared)
}

/// Whether the comma list `list` (ports, ranges `a-b`, names resolved by `named`) holds `port`.
fn lists_port(list: &str, port: i32, named: impl Fn(&str) -> Option<i32>) -> bool {
    list.split(',').map(str::trim).filter(|item| !item.is_empty()).any(|item| {
        if let Ok(n) = item.parse::<i32>() {
            return n == port;
        }
        if let Some((lo, hi)) = item.split_once('-')
            && let (Ok(lo), Ok(hi)) = (lo.trim().parse::<i32>(), hi.trim().parse::<i32>())
        {
            return (lo..=hi).contains(&port);
        }
        named(item) == Some(port)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

    use super::*;

    const NS: &str = "logistics";

    fn mk_spec() -> DataAccessPolicySpec {
        let mut spec: DataAccessPolicySpec = serde_json::from_value(serde_json::json!({
            "workload": {"selector": {"matchLabels": {"app": "customer-api"}}, "appPort": 8080},
            "mode": "Enforce",
            "rules": [],
        }))
        .unwrap();
        spec.workload.selector = LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "customer-api".into())])),
            ..LabelSelector::default()
        };
        spec
    }

    fn mk_pod(name: &str, opaque: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NS.into()),
                labels: Some(BTreeMap::from([("app".into(), "customer-api".into())])),
                annotations: opaque.map(|v| BTreeMap::from([(LINKERD_OPAQUE_PORTS.into(), v.into())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "custos-sidecar".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some(PROXY_PORT_NAME.into()),
                        container_port: 15080,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn mk_port(name: Option<&str>, app_protocol: Option<&str>, target: IntOrString) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            app_protocol: app_protocol.map(str::to_owned),
            port: 80,
            target_port: Some(target),
            ..ServicePort::default()
        }
    }

    fn mk_service(name: &str, app: &str, ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NS.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".into(), app.into())])),
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn check(pods: &[Pod], services: &[Service]) -> Vec<String> {
        let selected: Vec<&Pod> = pods.iter().collect();
        non_http_declarations(NS, &mk_spec(), &selected, services)
    }

    #[test]
    fn service_ports_istio_forwards_as_tcp_are_found() {
        let pods = [mk_pod("customer-api-0", None)];
        let by_name = IntOrString::String(PROXY_PORT_NAME.into());
        let cases: [(ServicePort, Option<&str>); 10] = [
            (mk_port(Some("tcp-api"), None, by_name.clone()), Some("tcp")),
            (mk_port(Some("tcp"), None, IntOrString::Int(15080)), Some("tcp")),
            (mk_port(Some("http"), Some("TCP"), by_name.clone()), Some("tcp")),
            (mk_port(Some("api"), Some("tls"), by_name.clone()), Some("tls")),
            (mk_port(Some("https-api"), None, by_name.clone()), Some("https")),
            (mk_port(Some("http-api"), None, by_name.clone()), None),
            (mk_port(Some("tcp-api"), Some("http"), by_name.clone()), None),
            (mk_port(Some("grpc"), None, by_name.clone()), None),
            (mk_port(None, None, by_name.clone()), None),
            // To the app port, not the proxy port: not this check's business.
            (mk_port(Some("tcp-app"), None, IntOrString::Int(8080)), None),
        ];
        for (port, expected) in cases {
            let what = format!("{:?}/{:?}", port.name, port.app_protocol);
            let found = check(&pods, &[mk_service("customer-api", "customer-api", vec![port])]);
            match expected {
                Some(protocol) => {
                    assert_eq!(found.len(), 1, "{what}: {found:?}");
                    assert!(found[0].contains(&format!("as {protocol} ")), "{what}: {found:?}");
                    assert!(found[0].starts_with("Service customer-api port "), "{found:?}");
                }
                None => assert!(found.is_empty(), "{what}: {found:?}"),
            }
        }
    }

    #[test]
    fn only_services_that_select_protected_pods_count() {
        let tcp = || vec![mk_port(Some("tcp-api"), None, IntOrString::Int(15080))];
        let pods = [mk_pod("customer-api-0", None)];
        assert!(check(&pods, &[mk_service("orders", "orders", tcp())]).is_empty());
        let mut elsewhere = mk_service("customer-api", "customer-api", tcp());
        elsewhere.metadata.namespace = Some("other".into());
        assert!(check(&pods, &[elsewhere]).is_empty());
        let mut no_selector = mk_service("customer-api", "customer-api", tcp());
        no_selector.spec.as_mut().unwrap().selector = None;
        assert!(check(&pods, &[no_selector]).is_empty());
        // No running pod yet: the workload selector's labels stand for them.
        assert_eq!(check(&[], &[mk_service("customer-api", "customer-api", tcp())]).len(), 1);
    }

    #[test]
    fn linkerd_opaque_ports_on_pods_and_services_are_found() {
        for (list, found) in [
            ("15080", true),
            ("8443, 15080", true),
            ("15000-15100", true),
            ("custos-proxy", true),
            ("8080", false),
            ("15081-15090", false),
            ("", false),
            ("x-y,,", false),
        ] {
            let pods = [mk_pod("customer-api-0", Some(list)), mk_pod("customer-api-1", None)];
            let result = check(&pods, &[]);
            assert_eq!(result.len(), usize::from(found), "{list:?}: {result:?}");
            if found {
                assert!(result[0].starts_with("pods customer-api-0 list the proxy port 15080"), "{result:?}");
            }
        }
        let mut service = mk_service(
            "customer-api",
            "customer-api",
            vec![mk_port(Some("http"), None, IntOrString::Int(15080))],
        );
        service.metadata.annotations = Some(BTreeMap::from([(LINKERD_OPAQUE_PORTS.into(), "80".into())]));
        let found = check(&[mk_pod("customer-api-0", None)], &[service]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains(LINKERD_OPAQUE_PORTS), "{found:?}");
    }

    #[test]
    fn many_opaque_pods_are_counted_not_all_named() {
        let pods: Vec<Pod> = (0..5).map(|i| mk_pod(&format!("customer-api-{i}"), Some("15080"))).collect();
        let found = check(&pods, &[]);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("pods customer-api-0, customer-api-1, customer-api-2 and 2 more"),
            "{found:?}"
        );
    }
}
