//! Step 1: read the Secrets a relay's spec points at.
//!
//! The operator itself needs only the PostgreSQL credentials (and CA) to provision
//! the slot; the Kafka Secrets are checked too, so a missing one is reported on the
//! resource now instead of as a worker pod that cannot start. Every Secret's
//! `resourceVersion` is kept for the pod template hash that rolls the workers when
//! credentials change. Secret values never go into logs, status or Events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::{ApiFailure, api_call};
use crate::api::OutboxRelaySpec;
use crate::api::conditions::reasons;

/// What the Secrets hold, as far as the operator needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Dereferenced {
    pub db_username: String,
    pub db_password: String,
    /// PEM of `spec.database.tls.caSecretRef`.
    pub pg_ca_pem: Option<Vec<u8>>,
    /// `resourceVersion` of every referenced Secret, by name.
    pub secret_versions: BTreeMap<String, String>,
    /// Referenced Secrets that lack the operator's `outbox.dev/in-use` finalizer.
    pub unguarded: BTreeSet<String>,
}

// Hand-written so the password never reaches a log line.
impl fmt::Debug for Dereferenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dereferenced")
            .field("db_username", &self.db_username)
            .field(
                "pg_ca_pem",
                &self.pg_ca_pem.as_ref().map(|p| format!("<{} bytes>", p.len())),
            )
            .field("secret_versions", &self.secret_versions)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Secret {name:?} (spec.{field}) does not exist in namespace {namespace:?}; create it with the key(s) {keys}"
    )]
    SecretNotFound {
        namespace: String,
        name: String,
        field: &'static str,
        keys: String,
    },

    #[error(
        "Secret {name:?} has no key {key:?} (spec.{field}); add the key to the Secret or point spec.{field} at one it has"
    )]
    SecretKeyMissing {
        name: String,
        key: String,
        field: &'static str,
    },

    #[error("key {key:?} of Secret {name:?} (spec.{field}) {problem}; store the value as plain UTF-8 text")]
    SecretValueInvalid {
        name: String,
        key: String,
        field: &'static str,
        problem: &'static str,
    },

    #[error("cannot read Secret {name:?}: {source}; check the operator's RBAC (secrets get) and the API server")]
    Read {
        name: String,
        #[source]
        source: ApiFailure,
    },
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::SecretNotFound { .. } => reasons::SECRET_NOT_FOUND,
            Error::SecretKeyMissing { .. } => reasons::SECRET_KEY_MISSING,
            Error::SecretValueInvalid { .. } => "SecretValueInvalid",
            Error::Read { .. } => "KubernetesApiError",
        }
    }
}

/// One `key` of one Secret, and the spec field that asks for it (for messages).
struct Wanted<'a> {
    secret: &'a str,
    key: &'a str,
    /// e.g. `database.credentialsSecretRef.usernameKey`.
    field: &'static str,
    /// The field naming the Secret, e.g. `database.credentialsSecretRef`.
    secret_field: &'static str,
}

/// Every Secret key the spec refers to.
fn wanted(spec: &OutboxRelaySpec) -> Vec<Wanted<'_>> {
    let db = &spec.database.credentials_secret_ref;
    let mut out = vec![
        Wanted {
            secret: &db.name,
            key: &db.username_key,
            field: "database.credentialsSecretRef.usernameKey",
            secret_field: "database.credentialsSecretRef",
        },
        Wanted {
            secret: &db.name,
            key: &db.password_key,
            field: "database.credentialsSecretRef.passwordKey",
            secret_field: "database.credentialsSecretRef",
        },
    ];
    if let Some(ca) = &spec.database.tls.ca_secret_ref {
        out.push(Wanted {
            secret: &ca.name,
            key: &ca.key,
            field: "database.tls.caSecretRef.key",
            secret_field: "database.tls.caSecretRef",
        });
    }
    if let Some(k) = &spec.kafka.security.credentials_secret_ref {
        out.push(Wanted {
            secret: &k.name,
            key: &k.username_key,
            field: "kafka.security.credentialsSecretRef.usernameKey",
            secret_field: "kafka.security.credentialsSecretRef",
        });
        out.push(Wanted {
            secret: &k.name,
            key: &k.password_key,
            field: "kafka.security.credentialsSecretRef.passwordKey",
            secret_field: "kafka.security.credentialsSecretRef",
        });
    }
    if let Some(ca) = &spec.kafka.security.ca_secret_ref {
        out.push(Wanted {
            secret: &ca.name,
            key: &ca.key,
            field: "kafka.security.caSecretRef.key",
            secret_field: "kafka.security.caSecretRef",
        });
    }
    out
}

/// Reads every referenced Secret once and checks that each wanted key is there.
pub async fn dereference(client: &Client, namespace: &str, spec: &OutboxRelaySpec) -> Result<Dereferenced, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let wanted = wanted(spec);
    let mut secrets: HashMap<&str, Secret> = HashMap::new();
    for w in &wanted {
        if secrets.contains_key(w.secret) {
            continue;
        }
        let secret = api_call(api.get_opt(w.secret)).await.map_err(|source| Error::Read {
            name: w.secret.to_string(),
            source,
        })?;
        let Some(secret) = secret else {
            let keys: Vec<String> = wanted
                .iter()
                .filter(|o| o.secret == w.secret)
                .map(|o| format!("{:?}", o.key))
                .collect();
            return Err(Error::SecretNotFound {
                namespace: namespace.to_string(),
                name: w.secret.to_string(),
                field: w.secret_field,
                keys: keys.join(", "),
            });
        };
        secrets.insert(w.secret, secret);
    }
    resolve(spec, &wanted, &secrets)
}

/// The pure half of [`dereference`]: picks the values out of the Secrets read.
fn resolve(
    spec: &OutboxRelaySpec,
    wanted: &[Wanted<'_>],
    secrets: &HashMap<&str, Secret>,
) -> Result<Dereferenced, Error> {
    for w in wanted {
        value(secrets, w)?;
    }
    let db = &wanted[..2];
    let db_username = text(secrets, &db[0])?;
    let db_password = text(secrets, &db[1])?;
    let pg_ca_pem = match &spec.database.tls.ca_secret_ref {
        Some(_) => wanted
            .iter()
            .find(|w| w.field == "database.tls.caSecretRef.key")
            .map(|w| value(secrets, w).map(<[u8]>::to_vec))
            .transpose()?,
        None => None,
    };
    let secret_versions = secrets
        .iter()
        .map(|(name, s)| {
            (
                name.to_string(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    let unguarded = secrets
        .iter()
        .filter(|(_, s)| {
            !s.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == super::secrets::FINALIZER))
        })
        .map(|(name, _)| name.to_string())
        .collect();
    Ok(Dereferenced {
        db_username,
        db_password,
        pg_ca_pem,
        secret_versions,
        unguarded,
    })
}

fn value<'s>(secrets: &'s HashMap<&str, Secret>, w: &Wanted<'_>) -> Result<&'s [u8], Error> {
    secrets
        .get(w.secret)
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(w.key))
        .map(|v| v.0.as_slice())
        .ok_or_else(|| Error::SecretKeyMissing {
            name: w.secret.to_string(),
            key: w.key.to_string(),
            field: w.field,
        })
}

fn text(secrets: &HashMap<&str, Secret>, w: &Wanted<'_>) -> Result<String, Error> {
    let invalid = |problem| Error::SecretValueInvalid {
        name: w.secret.to_string(),
        key: w.key.to_string(),
        field: w.field,
        problem,
    };
    let v = String::from_utf8(value(secrets, w)?.to_vec()).map_err(|_| invalid("is not UTF-8 text"))?;
    if v.is_empty() {
        return Err(invalid("is empty"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::api::OutboxRelay;

    fn secret(name: &str, rv: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn resolve_with(relay: &OutboxRelay, list: Vec<Secret>) -> Result<Dereferenced, Error> {
        let w = wanted(&relay.spec);
        let map: HashMap<&str, Secret> = list
            .into_iter()
            .filter_map(|s| {
                let name = s.metadata.name.clone()?;
                let key = w.iter().find(|x| x.secret == name)?.secret;
                Some((key, s))
            })
            .collect();
        resolve(&relay.spec, &w, &map)
    }

    #[test]
    fn reads_credentials_and_versions() {
        let r = OutboxRelay::test().with_pg_ca("pg-ca", "ca.crt");
        let d = resolve_with(
            &r,
            vec![
                secret("orders-db", "7", &[("username", b"relay"), ("password", b"pw")]),
                secret("pg-ca", "9", &[("ca.crt", b"-----BEGIN CERTIFICATE-----")]),
            ],
        )
        .unwrap();
        assert_eq!(d.db_username, "relay");
        assert_eq!(d.db_password, "pw");
        assert_eq!(d.pg_ca_pem.as_deref(), Some(&b"-----BEGIN CERTIFICATE-----"[..]));
        assert_eq!(d.secret_versions.get("orders-db").map(String::as_str), Some("7"));
        assert_eq!(d.secret_versions.get("pg-ca").map(String::as_str), Some("9"));
        assert!(!format!("{d:?}").contains("pw\""), "{d:?}");
    }

    #[test]
    fn missing_key_names_secret_key_and_field() {
        let r = OutboxRelay::test();
        let e = resolve_with(&r, vec![secret("orders-db", "1", &[("username", b"relay")])]).unwrap_err();
        assert_eq!(e.category(), "SecretKeyMissing");
        let msg = e.to_string();
        assert!(
            msg.contains("\"orders-db\"") && msg.contains("\"password\"") && msg.contains("passwordKey"),
            "{msg}"
        );
    }

    #[test]
    fn kafka_secrets_are_checked_too() {
        let r = OutboxRelay::test().with_kafka_sasl("kafka-user");
        let e = resolve_with(
            &r,
            vec![
                secret("orders-db", "1", &[("username", b"relay"), ("password", b"pw")]),
                secret("kafka-user", "2", &[("user", b"u")]),
            ],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("kafka.security.credentialsSecretRef.passwordKey"),
            "{e}"
        );
    }

    #[test]
    fn empty_or_binary_username_is_refused() {
        let r = OutboxRelay::test();
        let e = resolve_with(
            &r,
            vec![secret("orders-db", "1", &[("username", b""), ("password", b"pw")])],
        )
        .unwrap_err();
        assert_eq!(e.category(), "SecretValueInvalid");
        let e = resolve_with(
            &r,
            vec![secret(
                "orders-db",
                "1",
                &[("username", &[0xff, 0xfe]), ("password", b"pw")],
            )],
        )
        .unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }
}
