//! Step 3: render the worker Deployment. Pure and infallible: the same
//! [`Validated`] relay always gives the same object, so applying it again is a no-op.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::validate::Validated;
use crate::api::{CleanupPolicy, CredentialsSecretRef, LagThresholds, OutboxRelaySpec, SecretKeyRef, WorkerSpec};
use crate::relay::config::env;

/// Name of the worker container.
pub const CONTAINER: &str = "relay";
/// Port of the worker's `/metrics`, `/healthz` and `/readyz`.
pub const HTTP_PORT: i32 = 8080;
/// Pod template annotation that changes when a referenced Secret changes, so the
/// workers restart with the new credentials (env vars from Secrets are read once).
pub const CREDENTIALS_HASH_ANNOTATION: &str = "outbox.dev/credentials-hash";
/// Where the CA Secrets are mounted.
pub const PG_CA_DIR: &str = "/etc/outbox/pg-ca";
pub const KAFKA_CA_DIR: &str = "/etc/outbox/kafka-ca";

/// Environment variables of the worker that are not secrets.
pub mod worker_env {
    pub const SPEC: &str = "OUTBOX_RELAY_SPEC";
    pub const NAME: &str = "OUTBOX_RELAY_NAME";
    pub const NAMESPACE: &str = "OUTBOX_RELAY_NAMESPACE";
    pub const LOG_FORMAT: &str = "OUTBOX_LOG_FORMAT";
    pub const RUST_LOG: &str = "RUST_LOG";
}

/// `<relay>-relay`.
pub fn deployment_name(relay: &str) -> String {
    format!("{relay}-relay")
}

/// Labels that select a relay's pods. Never changed: a Deployment's selector is immutable.
pub fn selector_labels(relay: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "outbox-relay".to_string()),
        ("app.kubernetes.io/instance".to_string(), relay.to_string()),
    ])
}

/// Labels of the Deployment and its pods.
pub fn labels(relay: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(relay);
    l.insert("app.kubernetes.io/managed-by".into(), "outbox-operator".into());
    l.insert("app.kubernetes.io/component".into(), "relay-worker".into());
    l
}

/// The spec as the worker gets it in `OUTBOX_RELAY_SPEC`.
///
/// Slot and publication names are pinned to the ones the operator provisioned, so
/// the two can never derive different names. Fields only the operator reads
/// (suspend, replicas and other pod settings, cleanup policy, lag thresholds) are
/// reset to their defaults: changing them must not restart the worker, and an
/// env var change would.
pub fn worker_spec(v: &Validated) -> OutboxRelaySpec {
    let mut spec = v.spec.clone();
    spec.replication.slot_name = Some(v.database.slot.clone());
    spec.replication.publication_name = Some(v.database.publication.clone());
    spec.replication.lag = LagThresholds::default();
    spec.suspend = false;
    spec.cleanup_policy = CleanupPolicy::default();
    spec.worker = WorkerSpec::default();
    spec
}

/// FNV-1a over the Secrets' names and `resourceVersion`s, as 16 hex digits.
///
/// Versions rather than values: a hash of a short password in an annotation could
/// be brute-forced, a hash of version numbers reveals nothing.
pub fn credentials_hash(versions: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, rv) in versions {
        // The separators keep ("ab","c") and ("a","bc") apart.
        for b in name.bytes().chain([0]).chain(rv.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The worker Deployment of a relay.
pub fn deployment(v: &Validated) -> Deployment {
    let name = &v.identity.name;
    let labels = labels(name);
    let spec = &v.spec;
    let replicas = if spec.suspend { 0 } else { spec.worker.replicas };

    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("64Mi".into())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];

    let worker_spec_json = serde_json::to_string(&worker_spec(v))
        // Serializing plain data with string keys cannot fail; the fallback is only
        // there so this function stays infallible, and the worker would refuse it.
        .unwrap_or_default();
    let mut env = vec![
        plain(worker_env::SPEC, worker_spec_json),
        plain(worker_env::NAME, name.clone()),
        plain(worker_env::NAMESPACE, v.identity.namespace.clone()),
        plain(worker_env::LOG_FORMAT, "json".into()),
        plain(crate::relay::status_report::ENV, "true".into()),
    ];
    if let Some(level) = &spec.worker.log_level {
        env.push(plain(worker_env::RUST_LOG, level.clone()));
    }
    env.extend(credentials(
        &spec.database.credentials_secret_ref,
        env::DB_USERNAME,
        env::DB_PASSWORD,
    ));
    if let Some(k) = &spec.kafka.security.credentials_secret_ref {
        env.extend(credentials(k, env::KAFKA_USERNAME, env::KAFKA_PASSWORD));
    }
    if let Some(ca) = &spec.database.tls.ca_secret_ref {
        mount_ca(
            "pg-ca",
            PG_CA_DIR,
            ca,
            env::PG_CA_FILE,
            &mut volumes,
            &mut mounts,
            &mut env,
        );
    }
    if let Some(ca) = &spec.kafka.security.ca_secret_ref {
        mount_ca(
            "kafka-ca",
            KAFKA_CA_DIR,
            ca,
            env::KAFKA_CA_FILE,
            &mut volumes,
            &mut mounts,
            &mut env,
        );
    }

    let container = Container {
        name: CONTAINER.into(),
        image: Some(v.image.clone()),
        args: Some(vec!["relay".into(), "--listen".into(), format!("0.0.0.0:{HTTP_PORT}")]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: spec.worker.resources.clone(),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(name)),
            namespace: Some(v.identity.namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![v.identity.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(name)),
                ..LabelSelector::default()
            },
            // One slot, one streaming worker: a new pod comes up first and waits as hot
            // standby until the old one lets go of the slot, so a rollout never leaves
            // the slot unread and never runs two streams.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        CREDENTIALS_HASH_ANNOTATION.to_string(),
                        v.credentials_hash.clone(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    // The worker's own identity: it may write its `Delivering` condition
                    // and read its resource, nothing else (see worker_rbac).
                    service_account_name: Some(super::worker_rbac::worker_identity_name(name)),
                    automount_service_account_token: Some(true),
                    // Service env vars would only add noise next to OUTBOX_* settings.
                    enable_service_links: Some(false),
                    node_selector: (!spec.worker.node_selector.is_empty()).then(|| spec.worker.node_selector.clone()),
                    tolerations: (!spec.worker.tolerations.is_empty()).then(|| spec.worker.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(runtime_default()),
                        ..PodSecurityContext::default()
                    }),
                    // Long enough for the worker to drain what Kafka has not acknowledged yet.
                    termination_grace_period_seconds: Some(30),
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn plain(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn credentials(r: &CredentialsSecretRef, user_var: &str, password_var: &str) -> [EnvVar; 2] {
    [
        from_secret(user_var, &r.name, &r.username_key),
        from_secret(password_var, &r.name, &r.password_key),
    ]
}

fn mount_ca(
    volume: &str,
    dir: &str,
    ca: &SecretKeyRef,
    file_var: &str,
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
    env: &mut Vec<EnvVar>,
) {
    volumes.push(Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(ca.name.clone()),
            // Only the CA key: other keys of the same Secret (a private key, say) stay out of the pod.
            items: Some(vec![KeyToPath {
                key: ca.key.clone(),
                path: ca.key.clone(),
                mode: None,
            }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    mounts.push(VolumeMount {
        name: volume.into(),
        mount_path: dir.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    env.push(plain(file_var, format!("{dir}/{}", ca.key)));
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};

    use super::*;
    use crate::api::OutboxRelay;
    use crate::controller::dereference::Dereferenced;
    use crate::controller::validate::validate;
    use crate::relay::config::SpecFile;

    fn build(r: &OutboxRelay) -> Deployment {
        let v = validate(r, &Dereferenced::test(), "ghcr.io/example/outbox-operator:1.0").unwrap();
        deployment(&v)
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).unwrap()
    }

    fn container(d: &Deployment) -> &Container {
        &pod(d).containers[0]
    }

    fn env<'a>(d: &'a Deployment, name: &str) -> Option<&'a EnvVar> {
        container(d).env.as_ref().unwrap().iter().find(|e| e.name == name)
    }

    fn secret_ref<'a>(d: &'a Deployment, name: &str) -> (&'a str, &'a str) {
        let s = env(d, name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{name} is not from a Secret"));
        (s.name.as_str(), s.key.as_str())
    }

    #[test]
    fn metadata_labels_and_owner() {
        let d = build(&OutboxRelay::test());
        assert_eq!(d.metadata.name.as_deref(), Some("orders-relay"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("shop"));
        let labels = d.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "outbox-relay");
        assert_eq!(labels["app.kubernetes.io/instance"], "orders");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "outbox-operator");
        assert_eq!(labels["app.kubernetes.io/component"], "relay-worker");
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("OutboxRelay", "orders"));
        assert_eq!(owner.controller, Some(true));
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.selector.match_labels.as_ref(), Some(&selector_labels("orders")));
        let tmpl = spec.template.metadata.as_ref().unwrap();
        assert_eq!(tmpl.labels.as_ref(), Some(labels));
    }

    #[test]
    fn replicas_follow_spec_and_suspend() {
        let d = build(&OutboxRelay::test().with_worker(|w| w.replicas = 2));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
        let d = build(&OutboxRelay::test().with_worker(|w| w.replicas = 2).with_suspend(true));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(0));
        let s = d.spec.as_ref().unwrap().strategy.as_ref().unwrap();
        let ru = s.rolling_update.as_ref().unwrap();
        assert_eq!(
            (ru.max_surge.as_ref(), ru.max_unavailable.as_ref()),
            (Some(&IntOrString::Int(1)), Some(&IntOrString::Int(0)))
        );
    }

    #[test]
    fn container_runs_the_relay_with_probes() {
        let d = build(&OutboxRelay::test());
        let c = container(&d);
        assert_eq!(c.name, "relay");
        assert_eq!(c.image.as_deref(), Some("ghcr.io/example/outbox-operator:1.0"));
        assert_eq!(c.args.as_deref().unwrap(), ["relay", "--listen", "0.0.0.0:8080"]);
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.container_port), (Some("http"), 8080));
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
        assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
        assert_eq!(pod(&d).termination_grace_period_seconds, Some(30));
    }

    #[test]
    fn credentials_only_by_reference() {
        let d = build(&OutboxRelay::test().with_kafka_sasl("kafka-user"));
        assert_eq!(secret_ref(&d, "OUTBOX_DB_USERNAME"), ("orders-db", "username"));
        assert_eq!(secret_ref(&d, "OUTBOX_DB_PASSWORD"), ("orders-db", "password"));
        assert_eq!(secret_ref(&d, "OUTBOX_KAFKA_USERNAME"), ("kafka-user", "user"));
        assert_eq!(secret_ref(&d, "OUTBOX_KAFKA_PASSWORD"), ("kafka-user", "pass"));
        let text = serde_json::to_string(&d).unwrap();
        assert!(!text.contains("s3cret"), "a secret value leaked into the Deployment");
        let plain = build(&OutboxRelay::test());
        assert!(env(&plain, "OUTBOX_KAFKA_USERNAME").is_none());
    }

    #[test]
    fn worker_env_carries_identity_and_a_parsable_spec() {
        let r = OutboxRelay::test().with_worker(|w| w.log_level = Some("debug".into()));
        let d = build(&r);
        let val = |n: &str| env(&d, n).and_then(|e| e.value.clone());
        assert_eq!(val("OUTBOX_RELAY_NAME").as_deref(), Some("orders"));
        assert_eq!(val("OUTBOX_RELAY_NAMESPACE").as_deref(), Some("shop"));
        assert_eq!(val("OUTBOX_LOG_FORMAT").as_deref(), Some("json"));
        assert_eq!(val("RUST_LOG").as_deref(), Some("debug"));
        let spec = SpecFile::parse(&val("OUTBOX_RELAY_SPEC").unwrap()).unwrap().spec;
        assert_eq!(spec.replication.slot_name.as_deref(), Some("outbox_shop_orders"));
        assert_eq!(spec.replication.publication_name.as_deref(), Some("outbox_shop_orders"));
        assert_eq!(spec.kafka, r.spec.kafka);
        assert_eq!(spec.database, r.spec.database);
        assert!(env(&build(&OutboxRelay::test()), "RUST_LOG").is_none());
    }

    #[test]
    fn operator_only_fields_do_not_change_the_pod_template() {
        let base = build(&OutboxRelay::test());
        let tuned = build(
            &OutboxRelay::test()
                .with_lag(10, 20)
                .with_suspend(true)
                .with_worker(|w| w.replicas = 2),
        );
        assert_eq!(
            base.spec.as_ref().unwrap().template,
            tuned.spec.as_ref().unwrap().template
        );
    }

    #[test]
    fn cas_are_mounted_read_only_with_file_env() {
        let d = build(
            &OutboxRelay::test()
                .with_pg_ca("pg-ca", "ca.crt")
                .with_kafka_ca("kafka-ca", "root.pem"),
        );
        let val = |n: &str| env(&d, n).and_then(|e| e.value.clone());
        assert_eq!(val("OUTBOX_PG_CA_FILE").as_deref(), Some("/etc/outbox/pg-ca/ca.crt"));
        assert_eq!(
            val("OUTBOX_KAFKA_CA_FILE").as_deref(),
            Some("/etc/outbox/kafka-ca/root.pem")
        );
        let mounts = container(&d).volume_mounts.as_ref().unwrap();
        for (vol, dir) in [("pg-ca", PG_CA_DIR), ("kafka-ca", KAFKA_CA_DIR)] {
            let m = mounts.iter().find(|m| m.name == vol).unwrap();
            assert_eq!((m.mount_path.as_str(), m.read_only), (dir, Some(true)));
        }
        let vols = pod(&d).volumes.as_ref().unwrap();
        let pg = vols
            .iter()
            .find(|v| v.name == "pg-ca")
            .and_then(|v| v.secret.as_ref())
            .unwrap();
        assert_eq!(pg.secret_name.as_deref(), Some("pg-ca"));
        assert_eq!(pg.items.as_ref().unwrap()[0].key, "ca.crt");
    }

    #[test]
    fn hardened_security_context() {
        let d = build(&OutboxRelay::test());
        let sc = container(&d).security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let psc = pod(&d).security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(pod(&d).automount_service_account_token, Some(true));
        assert_eq!(
            pod(&d).service_account_name.as_deref(),
            Some(d.metadata.name.as_deref().unwrap())
        );
        assert_eq!(
            env(&d, "OUTBOX_STATUS_REPORTING").and_then(|e| e.value.as_deref()),
            Some("true")
        );
    }

    #[test]
    fn pod_settings_from_spec_worker() {
        let resources = ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".to_string(), Quantity("100m".into()))])),
            ..ResourceRequirements::default()
        };
        let toleration = Toleration {
            key: Some("dedicated".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        };
        let r = OutboxRelay::test().with_worker(|w| {
            w.resources = Some(resources.clone());
            w.node_selector = BTreeMap::from([("pool".to_string(), "relays".to_string())]);
            w.tolerations = vec![toleration.clone()];
        });
        let d = build(&r);
        assert_eq!(container(&d).resources.as_ref(), Some(&resources));
        assert_eq!(pod(&d).node_selector.as_ref().unwrap()["pool"], "relays");
        assert_eq!(pod(&d).tolerations.as_deref(), Some(&[toleration][..]));
        let plain = build(&OutboxRelay::test());
        assert!(pod(&plain).node_selector.is_none() && pod(&plain).tolerations.is_none());
    }

    #[test]
    fn credential_changes_roll_the_pods() {
        let r = OutboxRelay::test();
        let mut secrets = Dereferenced::test();
        let a = deployment(&validate(&r, &secrets, "img").unwrap());
        let again = deployment(&validate(&r, &secrets, "img").unwrap());
        assert_eq!(a, again, "rendering is deterministic");
        secrets.secret_versions.insert("orders-db".into(), "1002".into());
        let b = deployment(&validate(&r, &secrets, "img").unwrap());
        let hash = |d: &Deployment| {
            d.spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[CREDENTIALS_HASH_ANNOTATION]
                .clone()
        };
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a).len(), 16);
    }

    #[test]
    fn hash_separates_names_and_versions() {
        let one = BTreeMap::from([("ab".to_string(), "c".to_string())]);
        let two = BTreeMap::from([("a".to_string(), "bc".to_string())]);
        assert_ne!(credentials_hash(&one), credentials_hash(&two));
    }
}
