//! The pure core of the binding: given what PostgreSQL holds and what the relay
//! remembers, decide whether the relay may use (or create) its publication and
//! slot, or must refuse and say why.
//!
//! The rules, in order:
//! 1. An object another relay owns is never taken, altered or dropped: `Conflict`.
//!    Objects no existing relay owns (made by hand, or kept by a relay deleted with
//!    `Retain`) are taken only when the user says so (`outbox.dev/adopt`).
//! 2. A slot this relay had and no longer has, or one whose WAL is gone, is a loss:
//!    `SlotLost`; the same for a publication dropped under a live slot (pgoutput
//!    cannot decode the events written while it was missing). A server whose system
//!    identifier changed is `DatabaseChanged`. None of these is repaired silently:
//!    only a new value of `outbox.dev/recreate-slot` makes a new slot.
//! 3. Otherwise: keep what is there, or create what is missing on first use.

// `Refusal` is a verdict, computed once per reconcile, not an error travelling up a
// call stack: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;

use super::marker::{Marker, Ownership};
use crate::api::BindingStatus;
use crate::postgres::SlotInfo;

/// The relay asking, as recorded in ownership records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

impl Owner {
    pub fn relay(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What PostgreSQL holds, read by [`super::inspect`].
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub system_identifier: String,
    pub database: String,
    pub current_lsn: String,
    /// The relay's publication: `None` when it does not exist.
    pub publication: Option<Ownership>,
    pub slot: Option<SlotInfo>,
    /// Ownership records on *other* publications that name the relay's slot.
    pub slot_claims: Vec<Marker>,
}

/// What the relay remembers and what the user asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    /// `status.binding`, when it is about this slot.
    pub recorded: Option<BindingStatus>,
    /// The status shows the slot was provisioned by an operator version that kept no
    /// ownership records: its unmarked objects are this relay's.
    pub legacy: bool,
    /// A value of `outbox.dev/recreate-slot` not acted on yet.
    pub recreate: Option<String>,
    /// `outbox.dev/adopt: "true"`.
    pub adopt: bool,
    /// uids of record owners that no longer exist (the caller asked the API server).
    pub gone_owners: BTreeSet<String>,
}

/// Which object a conflict is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Slot,
    Publication,
    /// The emit function of a tableless relay (`spec.outbox.messages.function`): two
    /// relays with different prefixes would keep rewriting it, and the events of one
    /// application would go out with the other relay's prefix.
    EmitFunction,
    /// The outbox table of a polling relay (`mode: Polling`): one poller per
    /// table, or the second relay's worker would wait on the first one's lock
    /// forever while both look healthy.
    PolledTable,
}

impl Object {
    pub fn as_str(self) -> &'static str {
        match self {
            Object::Slot => "replication slot",
            Object::Publication => "publication",
            Object::EmitFunction => "emit function",
            Object::PolledTable => "polled outbox table",
        }
    }
}

/// Who holds an object the relay may not take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Another relay, by its ownership record.
    Relay {
        namespace: String,
        name: String,
        uid: String,
    },
    /// Nobody this operator knows: the object has no ownership record.
    Unknown,
}

impl Holder {
    fn of(m: &Marker) -> Holder {
        Holder::Relay {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            uid: m.uid.clone(),
        }
    }
}

/// How a recorded slot went missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The slot does not exist any more.
    SlotGone,
    /// `wal_status = lost`: the server removed WAL the slot still needed.
    WalRemoved,
    /// The publication was dropped while the slot lived.
    PublicationGone,
}

/// Why the relay may not use its objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Conflict {
        object: Object,
        name: String,
        holder: Holder,
    },
    Lost {
        loss: Loss,
        recorded: BindingStatus,
    },
    DatabaseChanged {
        recorded: BindingStatus,
        current: String,
    },
}

/// How the relay came to own its slot, for Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Take {
    /// First provisioning.
    Created,
    /// A new slot after a loss, on the user's request.
    Recreated { token: String, lost: BindingStatus },
    /// An existing slot taken over on the user's request; `from` says whose it was.
    Adopted { from: String },
    /// Objects of an operator version that kept no records, now recorded.
    Recorded,
}

/// What to do with the slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotStep {
    /// Use it as it is; `identity` is what status and record say about it.
    Keep { identity: BindingStatus },
    /// Create it (after dropping the lost one, if `drop_first`).
    Create { drop_first: bool },
}

/// The steps [`super::bind`] carries out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steps {
    pub slot: SlotStep,
    /// Set when ownership changes hands or starts being recorded.
    pub take: Option<Take>,
    /// A `recreate-slot` value to echo in status (acted on, or nothing to do).
    pub echo_recreate: Option<String>,
}

/// The decision. `slot` and `publication` are the relay's object names.
pub fn decide(me: &Owner, slot: &str, publication: &str, obs: &Observation, intent: &Intent) -> Result<Steps, Refusal> {
    let gone_adoptable = |uid: &str| intent.adopt && intent.gone_owners.contains(uid);
    let recorded = intent.recorded.as_ref().filter(|r| r.slot == slot);

    // 1. Ownership of the publication.
    let mut take = None;
    let our_marker = match &obs.publication {
        None => None,
        Some(Ownership::Marked(m)) if m.uid == me.uid => Some(m),
        Some(Ownership::Marked(m)) if gone_adoptable(&m.uid) => {
            take = Some(Take::Adopted { from: m.relay() });
            None
        }
        Some(Ownership::Marked(m)) => {
            return Err(Refusal::Conflict {
                object: Object::Publication,
                name: publication.to_string(),
                holder: Holder::of(m),
            });
        }
        Some(Ownership::Unmarked | Ownership::Foreign(_)) if intent.legacy => {
            take = Some(Take::Recorded);
            None
        }
        Some(Ownership::Unmarked | Ownership::Foreign(_)) if intent.adopt => {
            take = Some(Take::Adopted {
                from: "nobody (the publication had no ownership record)".into(),
            });
            None
        }
        Some(Ownership::Unmarked | Ownership::Foreign(_)) => {
            return Err(Refusal::Conflict {
                object: Object::Publication,
                name: publication.to_string(),
                holder: Holder::Unknown,
            });
        }
    };

    // 2. Other relays' claims on the slot. A gone owner's claim stays behind on its
    // retained publication; once this relay recorded the slot as its own, it is moot.
    for m in obs.slot_claims.iter().filter(|m| m.uid != me.uid) {
        if gone_adoptable(&m.uid) {
            take.get_or_insert(Take::Adopted { from: m.relay() });
        } else if !(recorded.is_some() && intent.gone_owners.contains(&m.uid)) {
            return Err(Refusal::Conflict {
                object: Object::Slot,
                name: slot.to_string(),
                holder: Holder::of(m),
            });
        }
    }

    let echo_recreate = intent.recreate.clone();
    // 3. What the relay knows about its slot: status first, else its own record.
    let known = recorded
        .cloned()
        .or_else(|| our_marker.and_then(|m| identity_from_marker(m, publication, obs)));
    if let Some(known) = known {
        let recreate = |drop_first: bool| -> Result<Steps, Refusal> {
            match &intent.recreate {
                Some(token) => Ok(Steps {
                    slot: SlotStep::Create { drop_first },
                    take: Some(Take::Recreated {
                        token: token.clone(),
                        lost: known.clone(),
                    }),
                    echo_recreate: echo_recreate.clone(),
                }),
                None => Err(Refusal::Lost {
                    loss: Loss::SlotGone,
                    recorded: known.clone(),
                }),
            }
        };
        let refuse_as = |loss: Loss| -> Refusal {
            Refusal::Lost {
                loss,
                recorded: known.clone(),
            }
        };
        if known.system_identifier != obs.system_identifier {
            return match (&intent.recreate, &obs.slot) {
                // A slot of that name on the new server is nobody's we know.
                (Some(_), Some(_)) => Err(Refusal::Conflict {
                    object: Object::Slot,
                    name: slot.to_string(),
                    holder: Holder::Unknown,
                }),
                (Some(_), None) => recreate(false),
                (None, _) => Err(Refusal::DatabaseChanged {
                    recorded: known.clone(),
                    current: obs.system_identifier.clone(),
                }),
            };
        }
        return match &obs.slot {
            None => recreate(false),
            Some(s) if s.wal_status.as_deref() == Some("lost") => {
                recreate(true).map_err(|_| refuse_as(Loss::WalRemoved))
            }
            Some(_) if obs.publication.is_none() => recreate(true).map_err(|_| refuse_as(Loss::PublicationGone)),
            Some(_) => Ok(Steps {
                slot: SlotStep::Keep { identity: known },
                take,
                echo_recreate,
            }),
        };
    }

    // 4. Nothing known: first use, or objects someone else made.
    match &obs.slot {
        // An earlier operator version provisioned this slot (its status says so)
        // but kept no record: the slot existed, so its absence is a loss too.
        None if intent.legacy && intent.recreate.is_none() => Err(Refusal::Lost {
            loss: Loss::SlotGone,
            recorded: BindingStatus {
                slot: slot.to_string(),
                publication: publication.to_string(),
                system_identifier: "unknown".into(),
                database: obs.database.clone(),
                slot_created_lsn: "unknown".into(),
                slot_created_at: None,
                recreated_for: None,
            },
        }),
        None => Ok(Steps {
            slot: SlotStep::Create { drop_first: false },
            take: Some(Take::Created),
            echo_recreate,
        }),
        Some(s) => {
            // Our own record, written just before creating the slot, whose second
            // half (the start position) never made it: the slot is ours.
            let ours_pending = our_marker.is_some_and(|m| m.slot == slot);
            let take = if ours_pending {
                take.or(Some(Take::Recorded))
            } else if intent.legacy {
                Some(take.unwrap_or(Take::Recorded))
            } else if intent.adopt {
                Some(take.unwrap_or(Take::Adopted {
                    from: "nobody (the slot had no ownership record)".into(),
                }))
            } else {
                return Err(Refusal::Conflict {
                    object: Object::Slot,
                    name: slot.to_string(),
                    holder: Holder::Unknown,
                });
            };
            if s.wal_status.as_deref() == Some("lost") {
                return Err(Refusal::Lost {
                    loss: Loss::WalRemoved,
                    recorded: identity_of_existing(slot, publication, obs, s),
                });
            }
            Ok(Steps {
                slot: SlotStep::Keep {
                    identity: identity_of_existing(slot, publication, obs, s),
                },
                take,
                echo_recreate,
            })
        }
    }
}

/// The identity a complete record of ours holds.
fn identity_from_marker(m: &Marker, publication: &str, obs: &Observation) -> Option<BindingStatus> {
    Some(BindingStatus {
        slot: m.slot.clone(),
        publication: publication.to_string(),
        system_identifier: m.system_identifier.clone(),
        database: obs.database.clone(),
        slot_created_lsn: m.slot_created_lsn.clone()?,
        slot_created_at: m
            .slot_created_at
            .as_deref()
            .and_then(|t| t.parse().ok())
            .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
        recreated_for: None,
    })
}

/// The identity of a slot that exists but whose start nobody recorded: its
/// confirmed position is the earliest point this relay can vouch for.
fn identity_of_existing(slot: &str, publication: &str, obs: &Observation, s: &SlotInfo) -> BindingStatus {
    BindingStatus {
        slot: slot.to_string(),
        publication: publication.to_string(),
        system_identifier: obs.system_identifier.clone(),
        database: obs.database.clone(),
        slot_created_lsn: s
            .confirmed_flush_lsn
            .clone()
            .or_else(|| s.restart_lsn.clone())
            .unwrap_or_else(|| obs.current_lsn.clone()),
        slot_created_at: None,
        recreated_for: None,
    }
}

#[cfg(test)]
mod tests;
