//! The binding between a relay and its PostgreSQL objects: the one place that
//! creates, verifies and drops a relay's publication and replication slot.
//!
//! Every call goes through the same three steps: [`inspect`] reads what the server
//! holds (ownership records, the slot, the server's identity), [`decide`] (pure)
//! says what the relay may do with it, and [`bind`] or [`release`] carry that out.
//! Ownership is recorded on the publication ([`marker`]) so that it survives a lost
//! status and is visible to every operator instance and to DBAs.
//!
//! The reconciler calls [`inspect`], [`decide`] and [`bind`] on every pass; cleanup
//! calls [`release`]; the deletion drain asks [`pending::pending_events`] what would
//! be dropped unrelayed.

mod confirm;
mod decide;
pub mod marker;
pub mod pending;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio_postgres::Client;

pub use confirm::confirm;
pub use decide::{Holder, Intent, Loss, Object, Observation, Owner, Refusal, SlotStep, Steps, Take, decide};
use marker::{Marker, Ownership};

use super::error::{col, query_error};
use super::objects;
use super::{PgError, QualifiedTable, SlotInfo, slot_status};
use crate::api::BindingStatus;

/// The relay's objects.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub owner: &'a Owner,
    pub slot: &'a str,
    pub publication: &'a str,
    pub table: &'a QualifiedTable,
    /// `source: Messages`: the publication lists no table (`table` is unused).
    pub tableless: bool,
}

/// Reads the server's identity, the relay's publication and slot, and every
/// ownership record that names the slot.
pub async fn inspect(client: &Client, t: &Target<'_>) -> Result<Observation, PgError> {
    let action = "read the server's identity";
    // pg_control_system() is executable by every role; the system identifier is what
    // tells a physical failover (same identifier) from another cluster (new one).
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                    current_database()::text,
                    pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    let system_identifier: String = col(&row, 0, action)?;
    let database: String = col(&row, 1, action)?;
    let current_lsn: String = col(&row, 2, action)?;

    let mut publication = None;
    let mut slot_claims = Vec::new();
    for (name, comment) in objects::publication_comments(client).await? {
        let ownership = Ownership::parse(comment.as_deref());
        if name == t.publication {
            publication = Some(ownership);
        } else if let Some(m) = ownership.marker()
            && m.slot == t.slot
        {
            slot_claims.push(m.clone());
        }
    }
    let slot = slot_status(client, t.slot).await?;
    Ok(Observation {
        system_identifier,
        database,
        current_lsn,
        publication,
        slot,
        slot_claims,
    })
}

/// What [`bind`] left in place.
#[derive(Clone, Debug, PartialEq)]
pub struct Bound {
    /// The slot's identity, for `status.binding`.
    pub identity: BindingStatus,
    /// The slot as the server reports it now.
    pub slot: Option<SlotInfo>,
    pub take: Option<Take>,
    /// The pass created or changed something (the slot, the publication, the
    /// record): what other relays' snapshots of this database say is out of date.
    pub changed: bool,
}

/// Carries out [`Steps`]: publication first (created, or repaired when ours), then
/// the ownership record, then the slot. The record is written before a slot is
/// created, so a crash in between leaves a slot that is recognisably this relay's.
pub async fn bind(
    client: &Client,
    t: &Target<'_>,
    obs: &Observation,
    steps: Steps,
    now: &Time,
) -> Result<Bound, PgError> {
    let publication = if t.tableless {
        super::messages::ensure_publication(client, t.publication).await?
    } else {
        objects::ensure_publication(client, t.publication, t.table).await?
    };
    let mut changed = publication.changed();
    // A slot kept as it was is the one `inspect` just read; only a new one is read again.
    let created = matches!(steps.slot, SlotStep::Create { .. });
    let mut identity = match steps.slot {
        SlotStep::Keep { identity } => {
            if !objects::verify_slot(client, t.slot).await? {
                // Dropped between inspect and now: the next pass reports the loss.
                return Err(PgError::Query {
                    action: "verify the replication slot",
                    code: None,
                    detail: "it was dropped while the operator was checking it".into(),
                });
            }
            identity
        }
        SlotStep::Create { drop_first } => {
            write_marker(client, t.publication, &marker_for(t, &obs.system_identifier, None)).await?;
            if drop_first {
                objects::drop_slot(client, t.slot).await?;
            }
            let lsn = objects::create_slot(client, t.slot).await?;
            BindingStatus {
                slot: t.slot.to_string(),
                publication: t.publication.to_string(),
                system_identifier: obs.system_identifier.clone(),
                database: obs.database.clone(),
                slot_created_lsn: lsn,
                slot_created_at: Some(now.clone()),
                recreated_for: None,
            }
        }
    };
    let marker = marker_for(t, &obs.system_identifier, Some(&identity));
    let current = match &obs.publication {
        Some(Ownership::Marked(m)) => Some(m),
        _ => None,
    };
    if current != Some(&marker) {
        write_marker(client, t.publication, &marker).await?;
        changed = true;
    }
    identity.recreated_for = steps.echo_recreate.or(identity.recreated_for);
    let slot = if created {
        slot_status(client, t.slot).await?
    } else {
        obs.slot.clone()
    };
    Ok(Bound {
        identity,
        slot,
        take: steps.take,
        changed: changed || created,
    })
}

/// The ownership record of `t`'s publication; `identity` is the slot's once it
/// exists (the record is written before the slot is created, without it).
pub(super) fn marker_for(t: &Target<'_>, system_identifier: &str, identity: Option<&BindingStatus>) -> Marker {
    Marker {
        uid: t.owner.uid.clone(),
        namespace: t.owner.namespace.clone(),
        name: t.owner.name.clone(),
        slot: t.slot.to_string(),
        system_identifier: system_identifier.to_string(),
        slot_created_lsn: identity.map(|i| i.slot_created_lsn.clone()),
        slot_created_at: identity
            .and_then(|i| i.slot_created_at.as_ref())
            .map(|t| t.0.to_string()),
    }
}

async fn write_marker(client: &Client, publication: &str, m: &Marker) -> Result<(), PgError> {
    objects::comment_publication(client, publication, Some(&m.to_comment())).await
}

/// What [`release`] did with each object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub slot: Fate,
    pub publication: Fate,
}

/// What happened to one object on release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    /// It did not exist.
    Absent,
    /// Left in place: it is not this relay's (`holder` says whose).
    NotOurs(Holder),
}

/// Whose each object is, as far as dropping goes: `None` when it does not exist,
/// `Some(Ok(()))` when it is the relay's own (its record names this relay, or, for
/// objects of an operator version without records, the relay's status says it
/// provisioned them), else who holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    pub slot: Option<Result<(), Holder>>,
    pub publication: Option<Result<(), Holder>>,
}

pub fn owned(t: &Target<'_>, obs: &Observation, intent: &Intent) -> Owned {
    let recorded = intent.recorded.as_ref().is_some_and(|r| r.slot == t.slot);
    let publication = match &obs.publication {
        None => None,
        Some(Ownership::Marked(m)) if m.uid == t.owner.uid => Some(Ok(())),
        Some(Ownership::Marked(m)) => Some(Err(holder_of(m))),
        Some(_) if intent.legacy || recorded => Some(Ok(())),
        Some(_) => Some(Err(Holder::Unknown)),
    };
    let claim = obs
        .slot_claims
        .iter()
        .find(|m| m.uid != t.owner.uid && !intent.gone_owners.contains(&m.uid));
    let slot = match (&obs.slot, claim) {
        (None, _) => None,
        (Some(_), Some(m)) => Some(Err(holder_of(m))),
        (Some(_), None) if matches!(publication, Some(Ok(()))) || recorded || intent.legacy => Some(Ok(())),
        (Some(_), None) => Some(Err(Holder::Unknown)),
    };
    Owned { slot, publication }
}

/// Drops the relay's slot and publication, each only if it is the relay's own
/// (see [`owned`]). A slot's holder is terminated first.
pub async fn release(client: &Client, t: &Target<'_>, intent: &Intent) -> Result<Released, PgError> {
    let obs = inspect(client, t).await?;
    let Owned { slot, publication } = owned(t, &obs, intent);
    let slot = match slot {
        None => Fate::Absent,
        Some(Err(h)) => Fate::NotOurs(h),
        Some(Ok(())) => {
            if objects::drop_slot(client, t.slot).await? {
                Fate::Dropped
            } else {
                Fate::Absent
            }
        }
    };
    let publication = match publication {
        None => Fate::Absent,
        Some(Err(h)) => Fate::NotOurs(h),
        Some(Ok(())) => {
            if objects::drop_publication(client, t.publication).await? {
                Fate::Dropped
            } else {
                Fate::Absent
            }
        }
    };
    Ok(Released { slot, publication })
}

fn holder_of(m: &Marker) -> Holder {
    Holder::Relay {
        namespace: m.namespace.clone(),
        name: m.name.clone(),
        uid: m.uid.clone(),
    }
}

/// The server's current WAL position (the drain's target when a deletion starts).
pub async fn current_lsn(client: &Client) -> Result<String, PgError> {
    let action = "read the current WAL position";
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| query_error(action, e))?;
    col(&row, 0, action)
}
