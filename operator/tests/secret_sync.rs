//! `--sync-sidecar-secrets` against the in-memory Kubernetes API: the sidecar Secrets of the
//! operator's namespace are copied into a namespace once it has policies (owned by them,
//! labelled as the operator's), follow a rotation of the original at the next reconcile, are
//! deleted with the last policy; a Secret of the same name that the user made is never
//! touched; a missing original fails the reconcile with its name and its own metric label.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use custos_operator::context::{Context, SecretSync, Settings};
use custos_operator::controller::reconcile_namespace;
use custos_operator::{Error, OperatorMetrics};
use custos_operator_core::names::{MANAGED_BY, MANAGED_BY_LABEL};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

const OPERATOR_NS: &str = "custos-system";
const TOKEN: &str = "custos-collector-token";
const HASH_KEY: &str = "custos-hash-key";

fn mk_secret(ns: &str, name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(key.to_string(), ByteString(value.as_bytes().to_vec()))])),
        ..Secret::default()
    }
}

fn syncing(client: &kube::Client) -> Context {
    Context::new(
        client.clone(),
        OperatorMetrics::new(),
        Settings {
            instance: "custos-operator-0".into(),
            secret_sync: Some(SecretSync {
                source_namespace: OPERATOR_NS.into(),
                names: vec![TOKEN.into(), HASH_KEY.into()],
                collector_token: Some(TOKEN.into()),
            }),
            ..Settings::default()
        },
    )
}

fn value(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

#[tokio::test]
async fn sidecar_secrets_follow_the_policies_of_a_namespace() {
    let client =
        fake_api(Objects { policies: vec![mk_policy(NS, "orders")], ..Objects::default() }, None).await;
    let secrets = |ns: &str| Api::<Secret>::namespaced(client.clone(), ns);
    let post = PostParams::default();
    // The original also holds a key sidecars do not use: it is not copied.
    let mut original = mk_secret(OPERATOR_NS, TOKEN, "token", "t0k3n-1");
    original
        .data
        .as_mut()
        .unwrap()
        .insert("database-url".into(), k8s_openapi::ByteString(b"postgres://x".to_vec()));
    secrets(OPERATOR_NS).create(&post, &original).await.unwrap();
    secrets(OPERATOR_NS).create(&post, &mk_secret(OPERATOR_NS, HASH_KEY, "key", "k3y")).await.unwrap();
    // The shop made its own hash key Secret: it stays the shop's.
    secrets(NS).create(&post, &mk_secret(NS, HASH_KEY, "key", "shop-own")).await.unwrap();
    let ctx = syncing(&client);

    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!((outcome.secrets_copied, outcome.secrets_deleted), (1, 0));
    let copy = secrets(NS).get(TOKEN).await.unwrap();
    // Not the collector token: the namespace's own, which sends its events and reads its
    // usage only.
    assert_eq!(value(&copy, "token"), custos_api::collector::namespace_token("t0k3n-1", NS));
    assert_eq!(copy.data.as_ref().unwrap().keys().collect::<Vec<_>>(), ["token"]);
    assert_eq!(copy.type_.as_deref(), Some("Opaque"));
    assert_eq!(copy.labels().get(MANAGED_BY_LABEL).map(String::as_str), Some(MANAGED_BY));
    let owners: Vec<_> = copy.owner_references().iter().map(|o| (o.kind.clone(), o.name.clone())).collect();
    assert_eq!(owners, [("DataAccessPolicy".to_string(), "orders".to_string())]);
    assert_eq!(value(&secrets(NS).get(HASH_KEY).await.unwrap(), "key"), "shop-own");
    // Nothing is copied into the operator's own namespace or a namespace without policies.
    assert!(secrets("billing").get_opt(TOKEN).await.unwrap().is_none());

    // Nothing changed: the copy is not written again.
    let version = secrets(NS).get(TOKEN).await.unwrap().resource_version();
    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!(outcome.secrets_copied, 0);
    assert_eq!(secrets(NS).get(TOKEN).await.unwrap().resource_version(), version);

    // A rotated original reaches the copy at the next reconcile.
    secrets(OPERATOR_NS).delete(TOKEN, &DeleteParams::default()).await.unwrap();
    secrets(OPERATOR_NS).create(&post, &mk_secret(OPERATOR_NS, TOKEN, "token", "t0k3n-2")).await.unwrap();
    reconcile_namespace(&ctx, NS).await.unwrap();
    assert_eq!(
        value(&secrets(NS).get(TOKEN).await.unwrap(), "token"),
        custos_api::collector::namespace_token("t0k3n-2", NS)
    );

    // The last policy goes: so does the copy, not the shop's own Secret nor the original.
    Api::<custos_api::DataAccessPolicy>::namespaced(client.clone(), NS)
        .delete("orders", &DeleteParams::orphan())
        .await
        .unwrap();
    let outcome = reconcile_namespace(&ctx, NS).await.unwrap();
    assert!(outcome.config_map_deleted);
    assert_eq!(outcome.secrets_deleted, 1);
    assert!(secrets(NS).get_opt(TOKEN).await.unwrap().is_none());
    assert_eq!(value(&secrets(NS).get(HASH_KEY).await.unwrap(), "key"), "shop-own");
    assert!(secrets(OPERATOR_NS).get_opt(TOKEN).await.unwrap().is_some());
}

#[tokio::test]
async fn a_missing_original_fails_the_reconcile_by_name_after_the_config_is_applied() {
    let client =
        fake_api(Objects { policies: vec![mk_policy(NS, "orders")], ..Objects::default() }, None).await;
    Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .create(&PostParams::default(), &mk_secret(OPERATOR_NS, TOKEN, "token", "t0k3n"))
        .await
        .unwrap();
    let error = reconcile_namespace(&syncing(&client), NS).await.unwrap_err();
    assert!(
        matches!(&error, Error::MissingSecret { namespace, name } if namespace == OPERATOR_NS && name == HASH_KEY),
        "{error:?}"
    );
    assert_eq!(error.metric_label(), "missing_secret");
    assert!(error.to_string().contains("custos-system/custos-hash-key"), "{error}");
    // The rest of the reconcile happened: the config, and the Secret that exists.
    assert!(config_map(&client, NS).await.is_some());
    assert!(Api::<Secret>::namespaced(client.clone(), NS).get_opt(TOKEN).await.unwrap().is_some());
}
