//! Step 2: turn the spec and the dereferenced Secrets into a [`Validated`] relay.
//!
//! No client and no I/O. The worker's own [`RelayConfig::from_spec`] does the spec
//! checks, so operator and worker can never disagree about what a spec means, and
//! both derive the slot and publication names the same way.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

use super::build;
use super::dereference::Dereferenced;
use crate::api::conditions::reasons;
use crate::api::names::{default_publication_name, default_slot_name};
use crate::api::{ColumnMapping, OutboxRelay, OutboxRelaySpec};
use crate::postgres::binding::{self, Owner};
use crate::postgres::{PgConnectConfig, QualifiedTable};
use crate::relay::config::{Credentials, MessageSource, RelayConfig};

/// Longest relay name: it becomes the value of the `app.kubernetes.io/instance`
/// label, and label values stop at 63 characters.
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidSpec(String),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => reasons::INVALID_SPEC,
        }
    }
}

/// Who the relay is: enough to name, own and label its children.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub namespace: String,
    pub name: String,
    /// Controller owner reference to the `OutboxRelay`, for the Deployment.
    pub owner: OwnerReference,
}

/// Checks name, namespace and uid. Objects read from the API server always have
/// them; this keeps a hand-made object from turning into a panic.
pub fn identity(relay: &OutboxRelay) -> Result<Identity, Error> {
    let namespace = relay
        .namespace()
        .ok_or_else(|| Error::InvalidSpec("the resource has no namespace".into()))?;
    let name = relay.name_any();
    if name.is_empty() {
        return Err(Error::InvalidSpec("the resource has no name".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidSpec(format!(
            "the name is {} characters long; it is used as a label value, which holds at most {MAX_NAME_LEN}: \
             recreate the relay under a shorter name",
            name.len()
        )));
    }
    let mut owner = relay
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec("the resource has no uid yet".into()))?;
    // Foreground deletion of the relay then waits for the Deployment to go.
    owner.block_owner_deletion = Some(true);
    Ok(Identity { namespace, name, owner })
}

/// Where and as whom the operator talks to PostgreSQL, and what it provisions there.
#[derive(Clone, Debug, PartialEq)]
pub struct DatabaseTarget {
    pub connect: PgConnectConfig,
    pub table: QualifiedTable,
    pub columns: ColumnMapping,
    /// `source: Messages`: prefix and emit function; `table` then only names the park table.
    pub messages: Option<MessageSource>,
    pub slot: String,
    pub publication: String,
}

impl DatabaseTarget {
    /// The relay's objects, as the binding module names them.
    pub fn binding<'a>(&'a self, owner: &'a Owner) -> binding::Target<'a> {
        binding::Target {
            owner,
            slot: &self.slot,
            publication: &self.publication,
            table: &self.table,
            tableless: self.messages.is_some(),
        }
    }
}

/// A relay whose spec passed every check, ready to be built and applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub identity: Identity,
    pub generation: Option<i64>,
    pub spec: OutboxRelaySpec,
    pub database: DatabaseTarget,
    /// The worker image: `spec.worker.image`, else the operator's default.
    pub image: String,
    /// Hash of the referenced Secrets' `resourceVersion`s, for the pod template.
    pub credentials_hash: String,
}

pub fn validate(relay: &OutboxRelay, secrets: &Dereferenced, default_image: &str) -> Result<Validated, Error> {
    let identity = identity(relay)?;
    let database = database_target(&identity, &relay.spec, secrets)?;
    if let Some(level) = &relay.spec.worker.log_level {
        tracing_subscriber::EnvFilter::builder().parse(level).map_err(|e| {
            Error::InvalidSpec(format!("spec.worker.logLevel {level:?} is not a valid log filter: {e}"))
        })?;
    }
    let image = relay
        .spec
        .worker
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_string());
    if image.trim().is_empty() {
        return Err(Error::InvalidSpec(
            "no worker image: set spec.worker.image or start the operator with --relay-image".into(),
        ));
    }
    Ok(Validated {
        identity,
        generation: relay.metadata.generation,
        spec: relay.spec.clone(),
        database,
        image,
        credentials_hash: build::credentials_hash(&secrets.secret_versions),
    })
}

/// The PostgreSQL half of [`validate`]; cleanup needs only this.
pub fn database_target(
    identity: &Identity,
    spec: &OutboxRelaySpec,
    secrets: &Dereferenced,
) -> Result<DatabaseTarget, Error> {
    let creds = Credentials {
        db_username: secrets.db_username.clone(),
        db_password: Some(secrets.db_password.clone()),
        pg_ca_pem: secrets.pg_ca_pem.clone(),
        ..Credentials::default()
    };
    let cfg = RelayConfig::from_spec(&identity.namespace, &identity.name, spec, &creds)
        .map_err(|e| Error::InvalidSpec(format!("{e}; correct the spec")))?;
    let mut connect = cfg.sql;
    // Lets a DBA tell the operator's short provisioning sessions from the worker's stream.
    connect.application_name = format!("outbox-operator/{}/{}", identity.namespace, identity.name);
    Ok(DatabaseTarget {
        connect,
        table: cfg.table,
        columns: cfg.columns,
        messages: cfg.messages,
        slot: cfg.slot,
        publication: cfg.publication,
    })
}

/// Slot and publication names of a spec, without Secrets (for cleanup messages).
pub fn object_names(namespace: &str, name: &str, spec: &OutboxRelaySpec) -> (String, String) {
    let r = &spec.replication;
    (
        r.slot_name
            .clone()
            .unwrap_or_else(|| default_slot_name(namespace, name)),
        r.publication_name
            .clone()
            .unwrap_or_else(|| default_publication_name(namespace, name)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_relay_validates() {
        let v = validate(&OutboxRelay::test(), &Dereferenced::test(), "relay:1").unwrap();
        assert_eq!(v.identity.namespace, "shop");
        assert_eq!(v.identity.name, "orders");
        assert_eq!(v.identity.owner.controller, Some(true));
        assert_eq!(v.identity.owner.kind, "OutboxRelay");
        assert_eq!(v.image, "relay:1");
        assert_eq!(v.database.slot, "outbox_shop_orders");
        assert_eq!(v.database.publication, "outbox_shop_orders");
        assert_eq!(v.database.connect.user, "relay");
        assert_eq!(v.database.connect.password.as_deref(), Some("s3cret"));
        assert_eq!(v.database.connect.application_name, "outbox-operator/shop/orders");
        assert_eq!(v.generation, Some(3));
        assert_eq!(
            object_names("shop", "orders", &OutboxRelay::test().spec),
            (v.database.slot.clone(), v.database.publication.clone())
        );
    }

    #[test]
    fn spec_image_wins() {
        let r = OutboxRelay::test().with_worker(|w| w.image = Some("mine:2".into()));
        assert_eq!(validate(&r, &Dereferenced::test(), "relay:1").unwrap().image, "mine:2");
        let e = validate(&OutboxRelay::test(), &Dereferenced::test(), "").unwrap_err();
        assert!(e.to_string().contains("--relay-image"), "{e}");
    }

    #[test]
    fn bad_specs_are_invalid_spec() {
        let mut r = OutboxRelay::test();
        r.spec.outbox.table = "outbox".into();
        let e = validate(&r, &Dereferenced::test(), "relay:1").unwrap_err();
        assert_eq!(e.category(), "InvalidSpec");

        let r = OutboxRelay::test().with_worker(|w| w.log_level = Some("info,relay=loud".into()));
        let e = validate(&r, &Dereferenced::test(), "relay:1").unwrap_err();
        assert!(e.to_string().contains("logLevel"), "{e}");

        let mut r = OutboxRelay::test();
        r.metadata.name = Some("x".repeat(64));
        let e = validate(&r, &Dereferenced::test(), "relay:1").unwrap_err();
        assert!(e.to_string().contains("shorter name"), "{e}");

        let mut r = OutboxRelay::test();
        r.metadata.uid = None;
        assert!(validate(&r, &Dereferenced::test(), "relay:1").is_err());
    }
}
