use std::collections::BTreeMap;

use custos_api::DataAccessPolicySpec;
use custos_api::policy::{IdentitySpec, JwtSpec, Mode, SecretKeyRef, UserIdentity, WorkloadSpec};
use k8s_openapi::api::core::v1::{Container, ContainerPort, EnvVar, PodOS, PodSpec, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

use super::*;
use crate::names::{INJECTED_ANNOTATION, SIDECAR_LABEL, SIDECAR_LABEL_VALUE};

const NS: &str = "logistics";
const NO_POLICIES: &[DataAccessPolicy] = &[];

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn mk_container(name: &str, ports: &[i32]) -> Container {
    Container {
        name: name.to_string(),
        image: Some("registry.example/customer-api:1.4".to_string()),
        ports: (!ports.is_empty()).then(|| {
            ports
                .iter()
                .map(|p| ContainerPort {
                    container_port: *p,
                    protocol: Some("TCP".to_string()),
                    ..ContainerPort::default()
                })
                .collect()
        }),
        ..Container::default()
    }
}

fn mk_pod(pod_labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("customer-api-7d9f-x2x4p".to_string()),
            namespace: Some(NS.to_string()),
            labels: Some(labels(pod_labels)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { containers: vec![mk_container("app", &[8080])], ..PodSpec::default() }),
        status: None,
    }
}

fn mk_selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector { match_labels: Some(labels(pairs)), match_expressions: None }
}

fn mk_policy(name: &str, selector: LabelSelector) -> DataAccessPolicy {
    let spec = DataAccessPolicySpec {
        workload: WorkloadSpec { selector, app_port: 8080, proxy_port: None, routing: None },
        mode: Mode::Enforce,
        default_action: custos_api::policy::Action::Deny,
        fail_open: false,
        identity: None,
        data_classes: Vec::new(),
        rules: Vec::new(),
        network_policy: None,
        audit: None,
    };
    let mut policy = DataAccessPolicy::new(name, spec);
    policy.metadata.namespace = Some(NS.to_string());
    policy
}

fn mk_jwks_policy(name: &str, selector: LabelSelector, secret: &str) -> DataAccessPolicy {
    let mut policy = mk_policy(name, selector);
    policy.spec.identity = Some(IdentitySpec {
        users: Some(UserIdentity {
            jwt: JwtSpec {
                issuer: "https://sso.example".to_string(),
                audiences: vec!["customer-api".to_string()],
                jwks_secret_ref: Some(SecretKeyRef { name: secret.to_string(), key: None }),
                jwks_uri: None,
                leeway_seconds: None,
            },
            attributes: BTreeMap::new(),
            id_claim: None,
        }),
    });
    policy
}

fn app_selected() -> (Pod, Vec<DataAccessPolicy>) {
    (
        mk_pod(&[("app", "customer-api")]),
        vec![mk_policy("customer-api", mk_selector(&[("app", "customer-api")]))],
    )
}

fn run(pod: &Pod, policies: &[DataAccessPolicy]) -> Injection {
    inject(pod, NS, &BTreeMap::new(), policies, &InjectSettings::default())
}

fn injected(outcome: Injection) -> (Pod, Vec<String>) {
    match outcome {
        Injection::Inject { pod, policies } => (*pod, policies),
        Injection::Skip(reason) => panic!("expected an injection, got Skip({reason:?})"),
        Injection::Refuse(refusal) => panic!("expected an injection, got Refuse({refusal:?})"),
    }
}

fn skipped(outcome: Injection) -> SkipReason {
    match outcome {
        Injection::Skip(reason) => reason,
        Injection::Inject { policies, .. } => panic!("expected a skip, got an injection for {policies:?}"),
        Injection::Refuse(refusal) => panic!("expected a skip, got Refuse({refusal:?})"),
    }
}

/// The reason a pod an enforced policy selects is refused for (it would run unprotected).
fn unprotected(outcome: Injection) -> SkipReason {
    match outcome {
        Injection::Refuse(Refusal::Unprotected { reason, enforced_by }) => {
            assert!(!enforced_by.is_empty());
            reason
        }
        other => panic!("expected a refusal of an unprotected pod, got {other:?}"),
    }
}

fn sidecar(pod: &Pod) -> &Container {
    let spec = pod.spec.as_ref().expect("pod spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == SIDECAR_CONTAINER)
        .expect("sidecar container")
}

fn env_of<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.iter().flatten().find(|e| e.name == name)
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    env_of(c, name).and_then(|e| e.value.clone())
}

fn volume<'a>(pod: &'a Pod, name: &str) -> Option<&'a Volume> {
    pod.spec.as_ref()?.volumes.iter().flatten().find(|v| v.name == name)
}

fn mount_path(c: &Container, volume: &str) -> Option<String> {
    c.volume_mounts.iter().flatten().find(|m| m.name == volume).map(|m| m.mount_path.clone())
}

#[test]
fn a_selected_pod_gets_the_sidecar() {
    let (pod, policies) = app_selected();
    let (out, names) = injected(run(&pod, &policies));
    assert_eq!(names, vec!["customer-api".to_string()]);
    assert_eq!(out.metadata.annotations.as_ref().unwrap()[INJECTED_ANNOTATION], "customer-api");
    let labels = out.metadata.labels.as_ref().unwrap();
    assert_eq!(labels.get(SIDECAR_LABEL).map(String::as_str), Some(SIDECAR_LABEL_VALUE));
    for (key, value) in pod.metadata.labels.iter().flatten() {
        assert_eq!(labels.get(key), Some(value), "the pod's own labels stay");
    }

    let spec = out.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 2);
    assert_eq!(
        spec.containers[0],
        pod.spec.as_ref().unwrap().containers[0],
        "the app container is untouched"
    );
    let c = sidecar(&out);
    let settings = InjectSettings::default();
    assert_eq!(c.image.as_deref(), Some(settings.image.as_str()));
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(c.resources.as_ref(), Some(&settings.resources));
    assert_eq!(c.args.as_deref(), Some(&["sidecar".to_string()][..]));
    assert_eq!(c.restart_policy, None);

    let ports: Vec<(Option<&str>, i32)> =
        c.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(ports, vec![(Some(PROXY_PORT_NAME), 15080), (Some(ADMIN_PORT_NAME), 15081)]);

    let ready = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
    assert_eq!(ready.path.as_deref(), Some("/ready"));
    assert_eq!(ready.port, IntOrString::Int(15081));
    let live = c.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));
    assert_eq!(live.port, IntOrString::Int(15081));

    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(65532));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]));
    assert_eq!(sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"));

    assert_eq!(env_value(c, "CUSTOS_CONFIG").as_deref(), Some("/etc/custos/config/config.json"));
    assert_eq!(env_value(c, "CUSTOS_POD_LABELS_FILE").as_deref(), Some("/etc/custos/pod/labels"));
    assert_eq!(env_value(c, "CUSTOS_LISTEN").as_deref(), Some("0.0.0.0:15080"));
    assert_eq!(env_value(c, "CUSTOS_ADMIN").as_deref(), Some("0.0.0.0:15081"));
    assert_eq!(env_value(c, "MIMALLOC_ARENA_EAGER_COMMIT").as_deref(), Some("0"));
    assert_eq!(env_value(c, "CUSTOS_SPOOL_DIR").as_deref(), Some(SPOOL_DIR));
    assert_eq!(env_value(c, "CUSTOS_JWKS_DIR").as_deref(), Some(JWKS_DIR));
    assert_eq!(env_value(c, "CUSTOS_PROXY_THREADS").as_deref(), Some("2"));
    assert_eq!(env_value(c, "CUSTOS_SHUTDOWN_DELAY").as_deref(), Some("5s"));
    assert_eq!(env_of(c, "CUSTOS_UPSTREAM"), None, "the policy names the app port");
    assert_eq!(env_of(c, "CUSTOS_COLLECTOR"), None);
    for (name, field) in [("CUSTOS_POD_NAME", "metadata.name"), ("CUSTOS_NAMESPACE", "metadata.namespace")] {
        let from = env_of(c, name).and_then(|e| e.value_from.as_ref()).and_then(|v| v.field_ref.as_ref());
        assert_eq!(from.map(|f| f.field_path.as_str()), Some(field), "{name}");
    }

    let config = volume(&out, "custos-config").and_then(|v| v.config_map.as_ref()).unwrap();
    assert_eq!(config.name, "custos-config");
    assert_eq!(config.optional, None);
    let downward = volume(&out, "custos-pod-info").and_then(|v| v.downward_api.as_ref()).unwrap();
    let files = downward.items.as_ref().unwrap();
    assert_eq!(files[0].path, "labels");
    assert_eq!(files[0].field_ref.as_ref().map(|f| f.field_path.as_str()), Some("metadata.labels"));
    assert!(volume(&out, "custos-spool").and_then(|v| v.empty_dir.as_ref()).is_some());
    assert_eq!(mount_path(c, "custos-config").as_deref(), Some(CONFIG_DIR));
    assert_eq!(mount_path(c, "custos-pod-info").as_deref(), Some(POD_INFO_DIR));
    assert_eq!(mount_path(c, "custos-spool").as_deref(), Some(SPOOL_DIR));
    for m in c.volume_mounts.iter().flatten() {
        assert_eq!(m.read_only, Some(m.name != "custos-spool"), "{}", m.name);
    }
}

#[test]
fn injecting_twice_changes_nothing() {
    let (pod, policies) = app_selected();
    let (out, _) = injected(run(&pod, &policies));
    assert_eq!(skipped(run(&out, &policies)), SkipReason::AlreadyInjected);
    assert_eq!(SkipReason::AlreadyInjected.warning(), None);

    let native = InjectSettings { native_sidecar: true, ..InjectSettings::default() };
    let Injection::Inject { pod: out, .. } = inject(&pod, NS, &BTreeMap::new(), &policies, &native) else {
        panic!("expected an injection")
    };
    assert_eq!(skipped(run(&out, &policies)), SkipReason::AlreadyInjected);
}

#[test]
fn the_annotation_opts_a_pod_out() {
    let (mut pod, policies) = app_selected();
    pod.metadata.annotations = Some(labels(&[(INJECT_ANNOTATION, "False")]));
    let reason = unprotected(run(&pod, &policies));
    assert_eq!(reason, SkipReason::OptedOut { selected_by: vec!["customer-api".to_string()] });
    let warning = reason.warning().unwrap();
    assert!(warning.contains("customer-api") && warning.contains("custos.dev/inject=false"), "{warning}");

    let reason = skipped(run(&pod, &[]));
    assert_eq!(reason, SkipReason::OptedOut { selected_by: Vec::new() });
    assert_eq!(reason.warning(), None);

    pod.metadata.annotations = Some(labels(&[(INJECT_ANNOTATION, "true")]));
    injected(run(&pod, &policies));
}

#[test]
fn a_pod_no_policy_selects_is_left_alone() {
    let (pod, _) = app_selected();
    let other = mk_policy("waybill-api", mk_selector(&[("app", "waybill-api")]));
    assert_eq!(skipped(run(&pod, &[other])), SkipReason::NotSelected);
    assert_eq!(skipped(run(&pod, &[])), SkipReason::NotSelected);
    let labelled_otherwise = labels(&[(NAMESPACE_INJECTION_LABEL, "yes")]);
    let outcome = inject(&pod, NS, &labelled_otherwise, NO_POLICIES, &InjectSettings::default());
    assert_eq!(skipped(outcome), SkipReason::NotSelected);
}

#[test]
fn a_namespace_labelled_disabled_opts_all_its_pods_out() {
    let (pod, policies) = app_selected();
    let disabled = labels(&[(NAMESPACE_INJECTION_LABEL, NAMESPACE_INJECTION_DISABLED)]);
    let reason = unprotected(inject(&pod, NS, &disabled, &policies, &InjectSettings::default()));
    assert_eq!(reason, SkipReason::NamespaceDisabled { selected_by: vec!["customer-api".to_string()] });
    let warning = reason.warning().unwrap();
    assert!(
        warning.contains("custos.dev/injection=disabled") && warning.contains("customer-api"),
        "{warning}"
    );

    let reason = skipped(inject(&pod, NS, &disabled, NO_POLICIES, &InjectSettings::default()));
    assert_eq!(reason, SkipReason::NamespaceDisabled { selected_by: Vec::new() });
    assert_eq!(reason.warning(), None);
}

#[test]
fn disabled_deleted_and_foreign_policies_do_not_select() {
    let (pod, _) = app_selected();
    let selector = mk_selector(&[("app", "customer-api")]);

    let mut disabled = mk_policy("disabled", selector.clone());
    disabled.spec.mode = Mode::Disabled;
    let mut deleting = mk_policy("deleting", selector.clone());
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let mut foreign = mk_policy("foreign", selector.clone());
    foreign.metadata.namespace = Some("billing".to_string());
    assert_eq!(skipped(run(&pod, &[disabled, deleting, foreign])), SkipReason::NotSelected);

    let mut audit = mk_policy("audit", selector);
    audit.spec.mode = Mode::Audit;
    assert_eq!(injected(run(&pod, &[audit])).1, vec!["audit".to_string()]);
}

/// A policy of the namespace that selects other pods: the namespace has a `custos-config`.
fn other_policy() -> DataAccessPolicy {
    mk_policy("billing", mk_selector(&[("app", "billing")]))
}

#[test]
fn a_labelled_namespace_injects_without_a_selecting_policy() {
    let pod = mk_pod(&[("app", "legacy")]);
    let ns_labels = labels(&[(NAMESPACE_INJECTION_LABEL, NAMESPACE_INJECTION_ENABLED)]);
    let others = [other_policy()];
    let (out, names) = injected(inject(&pod, NS, &ns_labels, &others, &InjectSettings::default()));
    assert!(names.is_empty());
    assert_eq!(out.metadata.annotations.as_ref().unwrap()[INJECTED_ANNOTATION], "");
    let c = sidecar(&out);
    assert_eq!(env_value(c, "CUSTOS_UPSTREAM").as_deref(), Some("127.0.0.1:8080"));
    assert_eq!(env_value(c, "CUSTOS_LISTEN").as_deref(), Some("0.0.0.0:15080"));

    let mut portless = pod.clone();
    portless.spec.as_mut().unwrap().containers[0].ports = None;
    let reason = skipped(inject(&portless, NS, &ns_labels, &others, &InjectSettings::default()));
    assert_eq!(reason, SkipReason::NoAppPort);
    assert!(reason.warning().is_some());

    // A selecting policy still decides the ports in a labelled namespace.
    let policy = mk_policy("legacy", mk_selector(&[("app", "legacy")]));
    let (out, names) = injected(inject(&pod, NS, &ns_labels, &[policy], &InjectSettings::default()));
    assert_eq!(names, vec!["legacy".to_string()]);
    assert_eq!(env_of(sidecar(&out), "CUSTOS_UPSTREAM"), None);
}

#[test]
fn a_labelled_namespace_without_any_policy_has_no_config_to_mount() {
    let pod = mk_pod(&[("app", "legacy")]);
    let ns_labels = labels(&[(NAMESPACE_INJECTION_LABEL, NAMESPACE_INJECTION_ENABLED)]);
    let reason = skipped(inject(&pod, NS, &ns_labels, NO_POLICIES, &InjectSettings::default()));
    assert_eq!(reason, SkipReason::NoConfigInNamespace);
    assert!(reason.warning().unwrap().contains("custos-config"));
    // A policy being deleted does not count: its config is about to go.
    let mut leaving = other_policy();
    leaving.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let reason = skipped(inject(&pod, NS, &ns_labels, &[leaving], &InjectSettings::default()));
    assert_eq!(reason, SkipReason::NoConfigInNamespace);
}

#[test]
fn the_first_tcp_port_is_the_upstream() {
    let mut pod = mk_pod(&[("app", "legacy")]);
    let spec = pod.spec.as_mut().unwrap();
    spec.containers[0].ports = Some(vec![
        ContainerPort { container_port: 53, protocol: Some("UDP".to_string()), ..ContainerPort::default() },
        ContainerPort { container_port: 9000, protocol: None, ..ContainerPort::default() },
    ]);
    let ns_labels = labels(&[(NAMESPACE_INJECTION_LABEL, NAMESPACE_INJECTION_ENABLED)]);
    let (out, _) = injected(inject(&pod, NS, &ns_labels, &[other_policy()], &InjectSettings::default()));
    assert_eq!(env_value(sidecar(&out), "CUSTOS_UPSTREAM").as_deref(), Some("127.0.0.1:9000"));
}

#[test]
fn host_network_and_windows_pods_an_enforced_policy_selects_are_refused() {
    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().host_network = Some(true);
    let reason = unprotected(run(&pod, &policies));
    assert_eq!(reason, SkipReason::HostNetwork { selected_by: vec!["customer-api".to_string()] });
    assert!(reason.warning().unwrap().contains("hostNetwork"));

    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().os = Some(PodOS { name: "windows".to_string() });
    assert_eq!(unprotected(run(&pod, &policies)).label(), "windows");
}

#[test]
fn policies_that_disagree_on_ports_are_reported() {
    let (pod, _) = app_selected();
    let selector = mk_selector(&[("app", "customer-api")]);
    let a = mk_policy("a", selector.clone());
    let mut b = mk_policy("b", selector.clone());
    b.spec.workload.proxy_port = Some(15081);
    let reason = unprotected(run(&pod, &[b.clone(), a.clone()]));
    assert_eq!(
        reason,
        SkipReason::ConflictingPolicies {
            policies: vec!["a".to_string(), "b".to_string()],
            field: "proxyPort",
            ports: vec![15080, 15081],
        }
    );
    assert!(reason.warning().unwrap().contains("spec.workload.proxyPort"));

    let mut c = mk_policy("c", selector);
    c.spec.workload.app_port = 9090;
    let reason = unprotected(run(&pod, &[a, c]));
    assert!(matches!(reason, SkipReason::ConflictingPolicies { field: "appPort", .. }), "{reason:?}");
}

#[test]
fn ports_and_volumes_the_sidecar_needs_must_be_free() {
    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().containers.push(mk_container("metrics", &[15081]));
    assert_eq!(
        unprotected(run(&pod, &policies)),
        SkipReason::PortInUse { port: 15081, container: "metrics".to_string() }
    );
    // Istio's Envoy serves its telemetry on 15090, where the admin port was until 2026-12-06:
    // a pod Istio injected first gets the sidecar.
    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().containers.push(mk_container("istio-proxy", &[15090, 15021, 15020]));
    injected(run(&pod, &policies));

    // Another admin port: the container, its probes and the check follow it.
    let settings = InjectSettings { admin_port: 9464, ..InjectSettings::default() };
    let (pod, policies) = app_selected();
    let (out, _) = injected(inject(&pod, NS, &BTreeMap::new(), &policies, &settings));
    let c = sidecar(&out);
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [15080, 9464]);
    assert_eq!(env_value(c, "CUSTOS_ADMIN").as_deref(), Some("0.0.0.0:9464"));
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        assert_eq!(probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap().port, IntOrString::Int(9464));
    }
    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().containers.push(mk_container("metrics", &[9464]));
    assert_eq!(
        unprotected(inject(&pod, NS, &BTreeMap::new(), &policies, &settings)),
        SkipReason::PortInUse { port: 9464, container: "metrics".to_string() }
    );

    // A policy whose proxyPort is the admin port cannot be served.
    let (pod, mut policies) = app_selected();
    policies[0].spec.workload.proxy_port = Some(15081);
    let reason = unprotected(run(&pod, &policies));
    assert_eq!(
        reason,
        SkipReason::ProxyPortIsAdminPort { port: 15081, policies: vec!["customer-api".into()] }
    );
    assert!(reason.to_string().contains("--sidecar-admin-port"), "{reason}");

    // The NetworkPolicies name the admin port: an app port of that name would be opened too.
    for name in [ADMIN_PORT_NAME, PROXY_PORT_NAME] {
        let (mut pod, policies) = app_selected();
        pod.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap()[0].name = Some(name.into());
        assert_eq!(
            unprotected(run(&pod, &policies)),
            SkipReason::PortNameInUse { name: name.into(), container: "app".to_string() }
        );
    }

    let (mut pod, mut policies) = app_selected();
    policies[0].spec.workload.proxy_port = Some(8443);
    pod.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap()[0].container_port = 8443;
    assert_eq!(
        unprotected(run(&pod, &policies)),
        SkipReason::PortInUse { port: 8443, container: "app".to_string() }
    );

    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().volumes =
        Some(vec![Volume { name: "custos-spool".to_string(), ..Volume::default() }]);
    assert_eq!(
        unprotected(run(&pod, &policies)),
        SkipReason::VolumeNameInUse { name: "custos-spool".to_string() }
    );
}

#[test]
fn jwks_secrets_of_the_selecting_policies_are_mounted() {
    let pod = mk_pod(&[("app", "customer-api"), ("tier", "backend")]);
    let policies = vec![
        mk_jwks_policy("by-app", mk_selector(&[("app", "customer-api")]), "sso-jwks"),
        mk_jwks_policy("by-tier", mk_selector(&[("tier", "backend")]), "sso-jwks"),
        mk_jwks_policy("also", mk_selector(&[("app", "customer-api")]), "partner-jwks"),
        mk_jwks_policy("elsewhere", mk_selector(&[("app", "waybill-api")]), "other-jwks"),
    ];
    let (out, names) = injected(run(&pod, &policies));
    assert_eq!(names, vec!["also".to_string(), "by-app".to_string(), "by-tier".to_string()]);
    assert_eq!(out.metadata.annotations.as_ref().unwrap()[INJECTED_ANNOTATION], "also,by-app,by-tier");
    let c = sidecar(&out);
    let secret =
        |v: &str| volume(&out, v).and_then(|v| v.secret.as_ref()).and_then(|s| s.secret_name.clone());
    assert_eq!(secret("custos-jwks-0").as_deref(), Some("partner-jwks"));
    assert_eq!(secret("custos-jwks-1").as_deref(), Some("sso-jwks"));
    assert_eq!(volume(&out, "custos-jwks-2"), None, "each Secret is mounted once");
    assert_eq!(mount_path(c, "custos-jwks-0").as_deref(), Some("/etc/custos/jwks/partner-jwks"));
    assert_eq!(mount_path(c, "custos-jwks-1").as_deref(), Some("/etc/custos/jwks/sso-jwks"));
}

#[test]
fn collector_and_hash_key_settings_reach_the_sidecar() {
    let (pod, policies) = app_selected();
    let settings = InjectSettings {
        image: "registry.example/custos:dev".to_string(),
        collector_url: Some("http://custos-collector.custos-system:8080".to_string()),
        collector_token_secret: Some("custos-collector-token".to_string()),
        hash_key_secret: Some("custos-hash-key".to_string()),
        run_as_user: 10001,
        proxy_threads: 6,
        extra_args: vec!["--max-connections=2000".to_string()],
        ..InjectSettings::default()
    };
    let (out, _) = injected(inject(&pod, NS, &BTreeMap::new(), &policies, &settings));
    let c = sidecar(&out);
    assert_eq!(c.image.as_deref(), Some("registry.example/custos:dev"));
    assert_eq!(c.args, Some(vec!["sidecar".to_string(), "--max-connections=2000".to_string()]));
    assert_eq!(c.security_context.as_ref().and_then(|s| s.run_as_user), Some(10001));
    assert_eq!(
        env_value(c, "CUSTOS_COLLECTOR").as_deref(),
        Some("http://custos-collector.custos-system:8080")
    );
    assert_eq!(
        env_value(c, "CUSTOS_COLLECTOR_TOKEN_FILE").as_deref(),
        Some("/var/run/secrets/custos/collector/token")
    );
    assert_eq!(env_value(c, "CUSTOS_HASH_KEY_FILE").as_deref(), Some("/var/run/secrets/custos/hash-key/key"));
    assert_eq!(env_value(c, "CUSTOS_PROXY_THREADS").as_deref(), Some("6"));
    let token = volume(&out, "custos-collector-token").and_then(|v| v.secret.as_ref()).unwrap();
    assert_eq!(token.secret_name.as_deref(), Some("custos-collector-token"));
    assert_eq!(token.items.as_ref().unwrap()[0].key, COLLECTOR_TOKEN_KEY);
    let hash = volume(&out, "custos-hash-key").and_then(|v| v.secret.as_ref()).unwrap();
    assert_eq!(hash.items.as_ref().unwrap()[0].key, HASH_KEY_KEY);
    assert_eq!(mount_path(c, "custos-collector-token").as_deref(), Some(COLLECTOR_TOKEN_DIR));
    assert_eq!(mount_path(c, "custos-hash-key").as_deref(), Some(HASH_KEY_DIR));
    // Every `custos sidecar` setting the injection makes is one extra arguments may not name,
    // but the shutdown delay and the drain time-out: defaults they may override.
    let set: Vec<&str> =
        c.env.iter().flatten().map(|e| e.name.as_str()).filter(|n| n.starts_with("CUSTOS_")).collect();
    let managed: Vec<&str> = MANAGED_ENV.to_vec();
    assert_eq!(
        set.iter().filter(|n| !managed.contains(n)).collect::<Vec<_>>(),
        [&"CUSTOS_SHUTDOWN_DELAY", &"CUSTOS_DRAIN_TIMEOUT"]
    );
    assert!(!is_managed_flag("--shutdown-delay") && !is_managed_flag("--drain-timeout"));
    assert!(
        is_managed_flag("--hash-key-file")
            && is_managed_flag("--proxy-threads")
            && is_managed_flag("--config")
            && is_managed_flag("--pod-labels-file")
    );
    assert!(
        !is_managed_flag("--upstream-max-connections")
            && !is_managed_flag("config")
            && !is_managed_flag("--hash_key_file")
    );
}

#[test]
fn proxy_threads_follow_the_cpu_limit() {
    for (limit, threads) in [
        (None, Some(DEFAULT_PROXY_THREADS)),
        (Some("1"), Some(1)),
        (Some("2"), Some(2)),
        (Some("100m"), Some(1)),
        (Some("1000m"), Some(1)),
        (Some("1001m"), Some(2)),
        (Some("2500m"), Some(3)),
        (Some("0.5"), Some(1)),
        (Some("1.5"), Some(2)),
        (Some("1.0001"), Some(2)),
        (Some("3.000"), Some(3)),
        (Some(".5"), Some(1)),
        (Some("4."), Some(4)),
        (Some("0"), Some(1)),
        (Some("0.0001m"), Some(1)),
        (Some("12"), Some(12)),
        (Some("200"), Some(MAX_PROXY_THREADS)),
        (Some("1k"), Some(MAX_PROXY_THREADS)),
        (Some("99999999999999999999"), None),
        (Some("9T"), Some(MAX_PROXY_THREADS)),
        (Some(""), None),
        (Some("."), None),
        (Some("m"), None),
        (Some("1Gi"), None),
        (Some("1e3"), None),
        (Some("-1"), None),
        (Some("+1"), None),
        (Some("1.2.3"), None),
        (Some("2 "), None),
        (Some("two"), None),
    ] {
        assert_eq!(proxy_threads_for_cpu_limit(limit), threads, "{limit:?}");
    }
}

proptest! {
    /// Any text is either refused or gives 1 to MAX_PROXY_THREADS threads, never fewer than
    /// the whole CPUs it names.
    #[test]
    fn proxy_threads_stay_in_range(limit in "[0-9.]{0,8}(m|k|M|G|T|Ki|e3|)", cores in 1u16..200) {
        if let Some(n) = proxy_threads_for_cpu_limit(Some(&limit)) {
            prop_assert!((1..=MAX_PROXY_THREADS).contains(&n));
        }
        let whole = cores.to_string();
        prop_assert_eq!(proxy_threads_for_cpu_limit(Some(&whole)), Some(cores.min(MAX_PROXY_THREADS)));
        let milli = format!("{}m", u32::from(cores) * 1000 - 1);
        prop_assert_eq!(proxy_threads_for_cpu_limit(Some(&milli)), Some(cores.min(MAX_PROXY_THREADS)));
    }
}

#[test]
fn a_native_sidecar_is_an_always_restarting_init_container() {
    let (pod, policies) = app_selected();
    let settings = InjectSettings { native_sidecar: true, ..InjectSettings::default() };
    let (out, _) = injected(inject(&pod, NS, &BTreeMap::new(), &policies, &settings));
    let spec = out.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 1);
    let init = spec.init_containers.as_ref().unwrap();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].name, SIDECAR_CONTAINER);
    assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
    assert_eq!(env_of(&init[0], "CUSTOS_SHUTDOWN_DELAY"), None, "stopped after the app: no delay");
}

#[test]
fn the_shutdown_delay_fits_the_grace_period() {
    // (terminationGracePeriodSeconds, CUSTOS_SHUTDOWN_DELAY, CUSTOS_DRAIN_TIMEOUT): delay,
    // drain, the 5 s event flush and a second of margin fit the grace period where it allows.
    for (grace, delay, drain) in [
        (None, Some("5s"), "19s"),
        (Some(30), Some("5s"), "19s"),
        (Some(120), Some("5s"), "20s"),
        (Some(12), Some("3s"), "3s"),
        (Some(10), Some("2s"), "2s"),
        (Some(4), Some("1s"), "1s"),
        (Some(3), None, "1s"),
        (Some(0), None, "1s"),
        (Some(-1), None, "1s"),
    ] {
        let (mut pod, policies) = app_selected();
        pod.spec.as_mut().unwrap().termination_grace_period_seconds = grace;
        let (out, _) = injected(run(&pod, &policies));
        assert_eq!(env_value(sidecar(&out), "CUSTOS_SHUTDOWN_DELAY").as_deref(), delay, "grace {grace:?}");
        assert_eq!(
            env_value(sidecar(&out), "CUSTOS_DRAIN_TIMEOUT").as_deref(),
            Some(drain),
            "grace {grace:?}"
        );
    }
    assert_eq!(drain_timeout_seconds(Some(i64::MIN), 0), 1);
    assert_eq!(drain_timeout_seconds(Some(i64::MAX), 5), 20);
    assert_eq!(shutdown_delay_seconds(Some(i64::MAX)), SHUTDOWN_DELAY_SECONDS);
    assert_eq!(shutdown_delay_seconds(Some(i64::MIN)), 0);
}

#[test]
fn a_pod_with_generate_name_and_no_name_is_injected() {
    let (mut pod, policies) = app_selected();
    pod.metadata.name = None;
    pod.metadata.generate_name = Some("customer-api-7d9f-".to_string());
    let (out, _) = injected(run(&pod, &policies));
    assert_eq!(out.metadata.name, None);
    assert_eq!(out.metadata.generate_name.as_deref(), Some("customer-api-7d9f-"));
    let name = env_of(sidecar(&out), "CUSTOS_POD_NAME").and_then(|e| e.value_from.as_ref());
    assert!(name.is_some(), "the name comes from the downward API at run time");
}

fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("(app|tier|zone|team)", "(a|b|c)", 0..4)
}

proptest! {
    #[test]
    fn injection_is_idempotent_and_keeps_the_app(
        pod_labels in arb_labels(),
        selectors in prop::collection::vec(arb_labels(), 0..4),
        labelled in any::<bool>(),
    ) {
        let mut pod = mk_pod(&[]);
        pod.metadata.labels = Some(pod_labels.clone());
        let policies: Vec<DataAccessPolicy> = selectors
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let selector = LabelSelector { match_labels: Some(s.clone()), match_expressions: None };
                mk_policy(&format!("p{i}"), selector)
            })
            .collect();
        let ns_labels = if labelled {
            labels(&[(NAMESPACE_INJECTION_LABEL, NAMESPACE_INJECTION_ENABLED)])
        } else {
            BTreeMap::new()
        };
        let settings = InjectSettings::default();
        let expected: Vec<String> = selectors
            .iter()
            .enumerate()
            .filter(|(_, s)| s.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
            .map(|(i, _)| format!("p{i}"))
            .collect();
        match inject(&pod, NS, &ns_labels, &policies, &settings) {
            Injection::Inject { pod: out, policies: names } => {
                prop_assert_eq!(&names, &expected);
                let app = &out.spec.as_ref().unwrap().containers[0];
                prop_assert_eq!(app, &pod.spec.as_ref().unwrap().containers[0]);
                // The pod's labels, and the sidecar label.
                let mut want_labels = pod_labels.clone();
                want_labels.insert(SIDECAR_LABEL.to_string(), SIDECAR_LABEL_VALUE.to_string());
                prop_assert_eq!(out.metadata.labels.as_ref(), Some(&want_labels));
                prop_assert_eq!(
                    inject(&out, NS, &ns_labels, &policies, &settings),
                    Injection::Skip(SkipReason::AlreadyInjected)
                );
            }
            Injection::Skip(reason) => {
                prop_assert!(expected.is_empty());
                if labelled {
                    // Labelled for injection, but no policy at all: no config to mount.
                    prop_assert!(policies.is_empty());
                    prop_assert_eq!(reason, SkipReason::NoConfigInNamespace);
                } else {
                    prop_assert_eq!(reason, SkipReason::NotSelected);
                }
            }
            Injection::Refuse(refusal) => prop_assert!(false, "refused: {refusal}"),
        }
    }
}

/// A pod an Audit-mode policy selects, that cannot get the sidecar, is admitted with a
/// warning; one an enforced policy selects is refused, with the enforced policies named.
#[test]
fn unprotected_pods_are_refused_only_under_enforce() {
    let (mut pod, mut policies) = app_selected();
    pod.spec.as_mut().unwrap().host_network = Some(true);
    policies[0].spec.mode = Mode::Audit;
    let reason = skipped(run(&pod, &policies));
    assert!(reason.warning().unwrap().contains("hostNetwork"));
    let mut enforced = mk_policy("enforced", mk_selector(&[("app", "customer-api")]));
    enforced.spec.mode = Mode::Enforce;
    policies.push(enforced);
    let Injection::Refuse(refusal) = run(&pod, &policies) else { panic!("expected a refusal") };
    assert_eq!(
        refusal,
        Refusal::Unprotected {
            reason: SkipReason::HostNetwork {
                selected_by: vec!["customer-api".to_string(), "enforced".to_string()]
            },
            enforced_by: vec!["enforced".to_string()],
        }
    );
    let message = refusal.to_string();
    assert!(
        message.contains("DataAccessPolicy enforced (mode Enforce)") && message.contains("hostNetwork"),
        "{message}"
    );
}

/// A container named like the sidecar that is not it (another image, or not running
/// `sidecar`) does not count as injected: refused under Enforce.
#[test]
fn a_foreign_container_named_like_the_sidecar_is_refused() {
    let (pod, policies) = app_selected();
    let (genuine, _) = injected(run(&pod, &policies));
    assert_eq!(skipped(run(&genuine, &policies)), SkipReason::AlreadyInjected);
    for forge in [
        |c: &mut Container| c.image = Some("alpine/socat".to_string()),
        |c: &mut Container| c.args = Some(vec!["collector".to_string()]),
        |c: &mut Container| c.command = Some(vec!["/bin/sh".to_string()]),
    ] {
        let mut fake = genuine.clone();
        let spec = fake.spec.as_mut().unwrap();
        forge(spec.containers.iter_mut().find(|c| c.name == SIDECAR_CONTAINER).unwrap());
        let reason = unprotected(run(&fake, &policies));
        assert_eq!(reason.label(), "foreign-sidecar");
        assert!(reason.to_string().contains("not the Custos sidecar"), "{reason}");
    }
    // No policy enforces: skipped, with a warning.
    let mut fake = pod.clone();
    fake.spec.as_mut().unwrap().containers.push(Container {
        name: SIDECAR_CONTAINER.to_string(),
        image: Some("alpine/socat".to_string()),
        ..Container::default()
    });
    let reason = skipped(run(&fake, &[]));
    assert!(reason.warning().is_some());
}

/// No container but the sidecar may mount its volumes: the audit spool, the collector token.
#[test]
fn containers_mounting_the_sidecars_volumes_are_refused() {
    use k8s_openapi::api::core::v1::{EphemeralContainer, VolumeMount};
    let mount = |volume: &str| {
        Some(vec![VolumeMount {
            name: volume.to_string(),
            mount_path: "/x".to_string(),
            ..VolumeMount::default()
        }])
    };
    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().containers[0].volume_mounts = mount("custos-spool");
    assert_eq!(
        run(&pod, &policies),
        Injection::Refuse(Refusal::SidecarVolumeMounted {
            container: "app".to_string(),
            volume: "custos-spool".to_string()
        })
    );
    let (mut pod, policies) = app_selected();
    let mut init = mk_container("setup", &[]);
    init.volume_mounts = mount("custos-config");
    pod.spec.as_mut().unwrap().init_containers = Some(vec![init]);
    assert!(matches!(run(&pod, &policies), Injection::Refuse(Refusal::SidecarVolumeMounted { .. })));
    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().ephemeral_containers = Some(vec![EphemeralContainer {
        name: "debug".to_string(),
        volume_mounts: mount("custos-spool"),
        ..EphemeralContainer::default()
    }]);
    assert!(matches!(run(&pod, &policies), Injection::Refuse(Refusal::SidecarVolumeMounted { .. })));
    // A volume of the pod's own is no concern.
    let (mut pod, policies) = app_selected();
    pod.spec.as_mut().unwrap().containers[0].volume_mounts = mount("data");
    injected(run(&pod, &policies));
    // A pod that arrives with the sidecar already (re-submitted, or written so) is held to the
    // same: its app may not mount the sidecar's volumes either.
    for native in [false, true] {
        let settings = InjectSettings { native_sidecar: native, ..InjectSettings::default() };
        let (pod, policies) = app_selected();
        let Injection::Inject { pod: injected_pod, .. } =
            inject(&pod, NS, &BTreeMap::new(), &policies, &settings)
        else {
            panic!("expected an injection")
        };
        let mut sneaky = *injected_pod;
        sneaky.spec.as_mut().unwrap().containers[0].volume_mounts = mount("custos-spool");
        assert_eq!(
            inject(&sneaky, NS, &BTreeMap::new(), &policies, &settings),
            Injection::Refuse(Refusal::SidecarVolumeMounted {
                container: "app".to_string(),
                volume: "custos-spool".to_string()
            }),
            "native: {native}"
        );
    }
}

// ---- updates of an injected pod ------------------------------------------------------------

fn mk_ephemeral(
    name: &str,
    target: Option<&str>,
    mounts: &[&str],
) -> k8s_openapi::api::core::v1::EphemeralContainer {
    k8s_openapi::api::core::v1::EphemeralContainer {
        name: name.to_string(),
        image: Some("busybox:1.36".to_string()),
        target_container_name: target.map(str::to_string),
        volume_mounts: (!mounts.is_empty()).then(|| {
            mounts
                .iter()
                .map(|v| k8s_openapi::api::core::v1::VolumeMount {
                    name: v.to_string(),
                    mount_path: format!("/mnt/{v}"),
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    }
}

/// An injected pod, regular or native sidecar.
fn mk_injected(native: bool) -> Pod {
    let (pod, policies) = app_selected();
    let settings = InjectSettings {
        native_sidecar: native,
        collector_token_secret: Some("custos-collector-token".into()),
        hash_key_secret: Some("custos-hash-key".into()),
        ..InjectSettings::default()
    };
    injected(inject(&pod, NS, &BTreeMap::new(), &policies, &settings)).0
}

fn sidecar_mut(pod: &mut Pod) -> &mut Container {
    let spec = pod.spec.as_mut().unwrap();
    spec.containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
        .find(|c| c.name == SIDECAR_CONTAINER)
        .unwrap()
}

fn with_ephemeral(pod: &Pod, containers: Vec<k8s_openapi::api::core::v1::EphemeralContainer>) -> Pod {
    let mut new = pod.clone();
    new.spec.as_mut().unwrap().ephemeral_containers = Some(containers);
    new
}

#[test]
fn updates_that_keep_the_sidecar_as_injected_are_admitted() {
    for native in [false, true] {
        let old = mk_injected(native);
        assert_eq!(check_update(&old, &old), None);
        // The app's own image may change (kubectl set image app=...), labels too.
        let mut new = old.clone();
        new.spec.as_mut().unwrap().containers[0].image = Some("registry.example/customer-api:1.5".into());
        new.metadata.labels.as_mut().unwrap().insert("release".into(), "canary".into());
        assert_eq!(check_update(&old, &new), None);
        // A debug container of its own, or targeting the app, with the app's volumes.
        let debug = with_ephemeral(&old, vec![mk_ephemeral("debugger", Some("app"), &["data"])]);
        assert_eq!(check_update(&old, &debug), None);
        // Ephemeral containers already there are not judged again.
        let old_with_bad = with_ephemeral(&old, vec![mk_ephemeral("old", Some(SIDECAR_CONTAINER), &[])]);
        assert_eq!(check_update(&old_with_bad, &old_with_bad.clone()), None);
    }
    // A pod without the sidecar is not looked at.
    let (plain, _) = app_selected();
    let mut swapped = plain.clone();
    swapped.spec.as_mut().unwrap().containers[0].image = Some("alpine/socat".into());
    assert_eq!(check_update(&plain, &swapped), None);
}

/// In a pod whose containers share one process namespace, no debug container is added: it
/// would see the sidecar's processes (and their files, with SYS_PTRACE) whatever it targets.
#[test]
fn debug_containers_are_refused_where_processes_are_shared() {
    for native in [false, true] {
        let mut old = mk_injected(native);
        old.spec.as_mut().unwrap().share_process_namespace = Some(true);
        for debug in [mk_ephemeral("debugger", Some("app"), &[]), mk_ephemeral("debugger", None, &[])] {
            let new = with_ephemeral(&old, vec![debug]);
            let refusal = check_update(&old, &new).expect("refused");
            assert_eq!(refusal, UpdateRefusal::SharedProcessNamespace { container: "debugger".into() });
            assert!(refusal.to_string().contains("kubectl debug --copy-to"), "{refusal}");
        }
        // Other updates of such a pod are judged as before.
        assert_eq!(check_update(&old, &old), None);
        let mut relabelled = old.clone();
        relabelled.metadata.labels.as_mut().unwrap().insert("release".into(), "canary".into());
        assert_eq!(check_update(&old, &relabelled), None);
    }
}

#[test]
fn updates_that_take_the_sidecar_away_are_refused() {
    for native in [false, true] {
        let old = mk_injected(native);

        let mut new = old.clone();
        sidecar_mut(&mut new).image = Some("alpine/socat:latest".into());
        let refusal = check_update(&old, &new).expect("image swap");
        assert_eq!(refusal, UpdateRefusal::SidecarChanged { field: "image" });
        assert!(refusal.to_string().contains("image of the custos-sidecar container"), "{refusal}");

        let mut new = old.clone();
        sidecar_mut(&mut new).args = Some(vec!["sidecar".into(), "--config=/dev/null".into()]);
        assert_eq!(check_update(&old, &new), Some(UpdateRefusal::SidecarChanged { field: "args" }));
        let mut new = old.clone();
        sidecar_mut(&mut new).command = Some(vec!["/bin/socat".into()]);
        assert_eq!(check_update(&old, &new), Some(UpdateRefusal::SidecarChanged { field: "command" }));

        let mut new = old.clone();
        sidecar_mut(&mut new).name = "renamed".into();
        assert_eq!(check_update(&old, &new), Some(UpdateRefusal::SidecarRemoved));

        let sidecar = sidecar(&old).clone();
        let volumes: Vec<String> = sidecar.volume_mounts.iter().flatten().map(|m| m.name.clone()).collect();
        assert!(volumes.len() >= 4, "{volumes:?}");
        for volume in &volumes {
            let new = with_ephemeral(&old, vec![mk_ephemeral("debugger", Some("app"), &["data", volume])]);
            assert_eq!(
                check_update(&old, &new),
                Some(UpdateRefusal::SidecarVolumeMounted {
                    container: "debugger".into(),
                    volume: volume.clone()
                }),
                "{volume}"
            );
        }
        let new = with_ephemeral(&old, vec![mk_ephemeral("peek", Some(SIDECAR_CONTAINER), &[])]);
        let refusal = check_update(&old, &new).expect("targets the sidecar");
        assert_eq!(refusal, UpdateRefusal::SidecarTargeted { container: "peek".into() });
        assert_eq!(refusal.label(), "sidecar-targeted");
        // Added after an existing one: still judged.
        let first = with_ephemeral(&old, vec![mk_ephemeral("a", None, &[])]);
        let second = with_ephemeral(
            &old,
            vec![mk_ephemeral("a", None, &[]), mk_ephemeral("b", Some(SIDECAR_CONTAINER), &[])],
        );
        assert_eq!(
            check_update(&first, &second),
            Some(UpdateRefusal::SidecarTargeted { container: "b".into() })
        );
    }
}
