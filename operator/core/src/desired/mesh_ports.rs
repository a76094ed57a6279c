//! The mesh's reading of the proxy port. Where a mesh's proxy sits in front of the Custos
//! sidecar and the sidecar takes the caller from the mesh's identity header
//! (`--caller-identity istio`: `x-forwarded-client-cert`; `linkerd`: `l5d-client-id`), the mesh
//! must read the proxy port as HTTP, which is when it sets that header from the client
//! certificate it verified and removes the caller's own. A port it forwards as opaque bytes
//! passes the caller's header through: any caller could name itself any workload. Checked
//! only for the mesh the sidecars take identities from (the operator's `--sidecar-arg
//! --caller-identity=...`); without one, the port's protocol changes nothing the sidecar
//! believes. Declared, for Istio, by a Service of the namespace selecting protected pods whose
//! port targets the proxy port (by number, by the sidecar's port name, or by a name a
//! protected pod gives it; Istio keys inbound protocols by target port) with:
//!
//! - an `appProtocol`, or else a port name, whose protocol (the part before the first `-`,
//!   any case) is one Istio forwards without reading HTTP: `tcp`, `tls`, `https` (passed
//!   through encrypted), `mongo`, `mysql`, `redis`; `kubernetes.io/wss` counts as `https`;
//! - or, without a recognised protocol, a Service port number Istio takes for TCP (25, 53,
//!   3306, 27017);
//!
//! and, for Linkerd, by:
//!
//! - `config.linkerd.io/opaque-ports` on a protected pod listing the proxy port (a number, a
//!   range `a-b`, or a container port name), or on such a Service listing that Service port
//!   (by number, range or Service port name);
//! - `appProtocol: linkerd.io/opaque` on such a Service port;
//! - a Service port without that annotation whose number is one of Linkerd's default opaque
//!   ports (25, 587, 3306, 4444, 5432, 6379, 9300, 11211).
//!
//! Not read: Linkerd `Server` resources (`proxyProtocol`), Istio `Sidecar` ingress listeners.

use std::collections::BTreeMap;

use custos_api::policy::DataAccessPolicySpec;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pods;
use crate::inject::PROXY_PORT_NAME;

/// Linkerd's annotation for ports its proxy forwards without protocol detection.
pub const LINKERD_OPAQUE_PORTS: &str = "config.linkerd.io/opaque-ports";

/// The mesh the sidecars take caller identities from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshIdentity {
    /// `--caller-identity istio`.
    Istio,
    /// `--caller-identity linkerd`.
    Linkerd,
}

impl MeshIdentity {
    /// The mesh that sidecar arguments (`--caller-identity=X` or `--caller-identity X`; the
    /// last one given wins) take identities from.
    pub fn from_sidecar_args(args: &[String]) -> Option<MeshIdentity> {
        let mut found = None;
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let value = match arg.strip_prefix("--caller-identity") {
                Some(rest) if rest.starts_with('=') => Some(rest[1..].to_string()),
                Some("") => iter.next().cloned(),
                _ => continue,
            };
            found = match value.as_deref() {
                Some("istio") => Some(MeshIdentity::Istio),
                Some("linkerd") => Some(MeshIdentity::Linkerd),
                _ => None,
            };
        }
        found
    }

    /// The header the sidecars believe.
    pub fn header(self) -> &'static str {
        match self {
            MeshIdentity::Istio => "x-forwarded-client-cert",
            MeshIdentity::Linkerd => "l5d-client-id",
        }
    }

    /// The flag's value.
    pub fn name(self) -> &'static str {
        match self {
            MeshIdentity::Istio => "istio",
            MeshIdentity::Linkerd => "linkerd",
        }
    }
}

/// Protocols Istio forwards without reading HTTP (its protocol selection by `appProtocol` or
/// port name).
const ISTIO_OPAQUE_PROTOCOLS: [&str; 6] = ["tcp", "tls", "https", "mongo", "mysql", "redis"];
/// Service port numbers Istio takes for TCP without a recognised protocol.
const ISTIO_TCP_PORTS: [i32; 4] = [25, 53, 3306, 27017];
/// Ports Linkerd treats as opaque unless told otherwise.
const LINKERD_DEFAULT_OPAQUE_PORTS: [i32; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];
/// Istio's recognised protocols (a name or `appProtocol` of another is not one).
const ISTIO_PROTOCOLS: [&str; 12] =
    ["http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "mysql", "redis", "udp", "h2c"];

/// Pods named in a finding; the rest are counted.
const PODS_NAMED: usize = 3;

/// What declares the proxy port of the policy's pods as not HTTP to `mesh`, one sentence
/// each, sorted.
///
/// The protected pods are `selected` (the running pods the workload selector matches); while
/// there are none, the selector's `matchLabels` stand for them.
pub(crate) fn non_http_declarations(
    mesh: MeshIdentity,
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
        let selects =
            |labels: &BTreeMap<String, String>| selector.iter().all(|(k, v)| labels.get(k) == Some(v));
        let Some(targets) = pods::targeted(selected, &stand_in, selects) else { continue };
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let ports = service_spec.ports.as_deref().unwrap_or_default();
        let opaque_list = service.metadata.annotations.as_ref().and_then(|a| a.get(LINKERD_OPAQUE_PORTS));
        for port in ports.iter().filter(|p| targets_proxy_port(p, proxy_port, &targets)) {
            let label = port.name.clone().unwrap_or_else(|| port.port.to_string());
            let why = match mesh {
                MeshIdentity::Istio => {
                    istio_opaque(port).map(|why| format!("{why} (Istio forwards it without reading HTTP)"))
                }
                MeshIdentity::Linkerd => linkerd_opaque(port, ports, opaque_list)
                    .map(|why| format!("{why} (Linkerd forwards it opaque)")),
            };
            if let Some(why) = why {
                found.push(format!("Service {name} port {label} targets the proxy port: {why}"));
            }
        }
    }
    if mesh == MeshIdentity::Linkerd {
        let opaque_pods: Vec<&str> = selected
            .iter()
            .filter(|p| {
                p.metadata.annotations.as_ref().and_then(|a| a.get(LINKERD_OPAQUE_PORTS)).is_some_and(
                    |list| {
                        lists_port(list, proxy_port, |name| {
                            if name == PROXY_PORT_NAME { Some(proxy_port) } else { pods::named_port(p, name) }
                        })
                    },
                )
            })
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        if !opaque_pods.is_empty() {
            let mut names = opaque_pods.iter().take(PODS_NAMED).copied().collect::<Vec<_>>().join(", ");
            if opaque_pods.len() > PODS_NAMED {
                names.push_str(&format!(" and {} more", opaque_pods.len() - PODS_NAMED));
            }
            found.push(format!(
                "pods {names} list the proxy port {proxy_port} in {LINKERD_OPAQUE_PORTS} (Linkerd forwards it opaque)"
            ));
        }
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

/// Why Istio would forward `port` without reading HTTP, if it would.
fn istio_opaque(port: &ServicePort) -> Option<String> {
    let protocol = |text: &str| {
        let text = text.to_ascii_lowercase();
        if text == "kubernetes.io/wss" {
            return "https".to_string();
        }
        // `grpc-web` is a protocol of its own; otherwise the part before the first `-`.
        if text.starts_with("grpc-web") {
            "grpc-web".to_string()
        } else {
            text.split('-').next().unwrap_or_default().to_string()
        }
    };
    let declared = port
        .app_protocol
        .as_deref()
        .map(|a| ("appProtocol", protocol(a)))
        .filter(|(_, p)| ISTIO_PROTOCOLS.contains(&p.as_str()))
        .or_else(|| {
            port.name
                .as_deref()
                .map(|n| ("name", protocol(n)))
                .filter(|(_, p)| ISTIO_PROTOCOLS.contains(&p.as_str()))
        });
    match declared {
        Some((how, p)) if ISTIO_OPAQUE_PROTOCOLS.contains(&p.as_str()) => Some(format!("its {how} says {p}")),
        Some(_) => None,
        None if ISTIO_TCP_PORTS.contains(&port.port) => {
            Some(format!("its number {} is TCP to Istio without a protocol", port.port))
        }
        None => None,
    }
}

/// Why Linkerd would forward Service port `port` (of `ports`, the Service's opaque-ports
/// annotation `opaque_list`) opaque, if it would.
fn linkerd_opaque(port: &ServicePort, ports: &[ServicePort], opaque_list: Option<&String>) -> Option<String> {
    if port.app_protocol.as_deref() == Some("linkerd.io/opaque") {
        return Some("its appProtocol is linkerd.io/opaque".to_string());
    }
    match opaque_list {
        Some(list) => {
            let by_name = |name: &str| ports.iter().find(|p| p.name.as_deref() == Some(name)).map(|p| p.port);
            lists_port(list, port.port, by_name)
                .then(|| format!("the Service's {LINKERD_OPAQUE_PORTS} lists it"))
        }
        None => LINKERD_DEFAULT_OPAQUE_PORTS
            .contains(&port.port)
            .then(|| format!("its number {} is one of Linkerd's default opaque ports", port.port)),
    }
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

    fn check(mesh: MeshIdentity, pods: &[Pod], services: &[Service]) -> Vec<String> {
        let selected: Vec<&Pod> = pods.iter().collect();
        non_http_declarations(mesh, NS, &mk_spec(), &selected, services)
    }

    fn by_name() -> IntOrString {
        IntOrString::String(PROXY_PORT_NAME.into())
    }

    #[test]
    fn the_mesh_comes_from_the_sidecar_arguments() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        assert_eq!(
            MeshIdentity::from_sidecar_args(&args(&["--caller-identity=istio"])),
            Some(MeshIdentity::Istio)
        );
        assert_eq!(
            MeshIdentity::from_sidecar_args(&args(&["--max-connections=9", "--caller-identity", "linkerd"])),
            Some(MeshIdentity::Linkerd)
        );
        assert_eq!(
            MeshIdentity::from_sidecar_args(&args(&["--caller-identity=istio", "--caller-identity=none"])),
            None
        );
        assert_eq!(MeshIdentity::from_sidecar_args(&args(&["--caller-identity-x=istio", "istio"])), None);
        assert_eq!(MeshIdentity::from_sidecar_args(&args(&["--caller-identity"])), None);
    }

    #[test]
    fn service_ports_istio_forwards_without_reading_http_are_found() {
        let pods = [mk_pod("customer-api-0", None)];
        let numbered = |n: i32, name: Option<&str>| ServicePort { port: n, ..mk_port(name, None, by_name()) };
        let cases: Vec<(ServicePort, Option<&str>)> = vec![
            (mk_port(Some("tcp-api"), None, by_name()), Some("its name says tcp")),
            (mk_port(Some("TCP"), None, IntOrString::Int(15080)), Some("its name says tcp")),
            (mk_port(Some("http"), Some("TCP"), by_name()), Some("its appProtocol says tcp")),
            (mk_port(Some("api"), Some("tls"), by_name()), Some("its appProtocol says tls")),
            (mk_port(Some("http"), Some("tcp-x"), by_name()), Some("its appProtocol says tcp")),
            (mk_port(Some("http"), Some("kubernetes.io/wss"), by_name()), Some("its appProtocol says https")),
            (mk_port(Some("https-api"), None, by_name()), Some("its name says https")),
            (mk_port(Some("tcp-api"), Some("custom"), by_name()), Some("its name says tcp")),
            (numbered(3306, Some("api")), Some("its number 3306 is TCP to Istio without a protocol")),
            (numbered(3306, Some("http-db")), None),
            (mk_port(Some("http-api"), None, by_name()), None),
            (mk_port(Some("tcp-api"), Some("http"), by_name()), None),
            (mk_port(Some("grpc-web"), None, by_name()), None),
            (mk_port(Some("grpc"), None, by_name()), None),
            (mk_port(None, None, by_name()), None),
            // Linkerd's marks are not Istio's.
            (mk_port(Some("api"), Some("linkerd.io/opaque"), by_name()), None),
            // To the app port, not the proxy port: not this check's business.
            (mk_port(Some("tcp-app"), None, IntOrString::Int(8080)), None),
        ];
        for (port, expected) in cases {
            let what = format!("{:?}/{:?}/{}", port.name, port.app_protocol, port.port);
            let found =
                check(MeshIdentity::Istio, &pods, &[mk_service("customer-api", "customer-api", vec![port])]);
            match expected {
                Some(why) => {
                    assert_eq!(found.len(), 1, "{what}: {found:?}");
                    assert!(found[0].contains(why), "{what}: {found:?}");
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
        let istio = |pods: &[Pod], services: &[Service]| check(MeshIdentity::Istio, pods, services);
        assert!(istio(&pods, &[mk_service("orders", "orders", tcp())]).is_empty());
        let mut elsewhere = mk_service("customer-api", "customer-api", tcp());
        elsewhere.metadata.namespace = Some("other".into());
        assert!(istio(&pods, &[elsewhere]).is_empty());
        let mut no_selector = mk_service("customer-api", "customer-api", tcp());
        no_selector.spec.as_mut().unwrap().selector = None;
        assert!(istio(&pods, &[no_selector]).is_empty());
        let mut udp = mk_service("customer-api", "customer-api", tcp());
        udp.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        assert!(istio(&pods, &[udp]).is_empty());
        // No running pod yet: the workload selector's labels stand for them.
        assert_eq!(istio(&[], &[mk_service("customer-api", "customer-api", tcp())]).len(), 1);
    }

    #[test]
    fn linkerd_opaque_ports_on_pods_are_found() {
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
            let result = check(MeshIdentity::Linkerd, &pods, &[]);
            assert_eq!(result.len(), usize::from(found), "{list:?}: {result:?}");
            if found {
                assert!(result[0].starts_with("pods customer-api-0 list the proxy port 15080"), "{result:?}");
            }
            // Istio does not read Linkerd's annotation.
            assert!(check(MeshIdentity::Istio, &pods, &[]).is_empty());
        }
    }

    #[test]
    fn linkerd_opaque_service_ports_are_found() {
        let pods = [mk_pod("customer-api-0", None)];
        let service = |port: ServicePort, annotation: Option<&str>| {
            let mut s = mk_service("customer-api", "customer-api", vec![port]);
            s.metadata.annotations =
                annotation.map(|a| BTreeMap::from([(LINKERD_OPAQUE_PORTS.into(), a.into())]));
            s
        };
        let numbered = |n: i32| ServicePort { port: n, ..mk_port(Some("api"), None, by_name()) };
        let cases = [
            (service(mk_port(Some("api"), None, by_name()), Some("80")), Some("lists it")),
            (service(mk_port(Some("api"), None, by_name()), Some("api")), Some("lists it")),
            (service(mk_port(Some("api"), None, by_name()), Some("1-100")), Some("lists it")),
            (
                service(mk_port(Some("api"), Some("linkerd.io/opaque"), by_name()), None),
                Some("linkerd.io/opaque"),
            ),
            (service(numbered(5432), None), Some("default opaque ports")),
            // An annotation replaces the default list.
            (service(numbered(5432), Some("9999")), None),
            (service(mk_port(Some("api"), None, by_name()), Some("8080")), None),
            (service(mk_port(Some("tcp-api"), None, by_name()), None), None),
        ];
        for (s, expected) in cases {
            let found = check(MeshIdentity::Linkerd, &pods, std::slice::from_ref(&s));
            match expected {
                Some(why) => {
                    assert_eq!(found.len(), 1, "{s:?}: {found:?}");
                    assert!(found[0].contains(why), "{found:?}");
                }
                None => assert!(found.is_empty(), "{s:?}: {found:?}"),
            }
        }
    }

    #[test]
    fn many_opaque_pods_are_counted_not_all_named() {
        let pods: Vec<Pod> = (0..5).map(|i| mk_pod(&format!("customer-api-{i}"), Some("15080"))).collect();
        let found = check(MeshIdentity::Linkerd, &pods, &[]);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("pods customer-api-0, customer-api-1, customer-api-2 and 2 more"),
            "{found:?}"
        );
    }
}
