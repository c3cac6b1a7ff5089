//! The status messages of a relay that may not use its PostgreSQL objects: what is
//! wrong, which events are at stake, and what to do. Pure.

use super::conflicts::CacheConflict;
use super::status::Problem;
use super::validate::DatabaseTarget;
use crate::api::conditions::reasons;
use crate::api::{OutboxRelay, annotations};
use crate::postgres::binding::{Holder, Loss, Object, Refusal};

/// Another relay in the cache names the same slot, publication or emit function and
/// keeps it.
pub fn cache_conflict(c: &CacheConflict) -> Problem {
    Problem::new(
        reasons::CONFLICT,
        format!(
            "The {} {:?} in this database is also named by OutboxRelay {}/{}, which holds it; this relay does not \
             touch it and its worker is scaled to zero. Create a new OutboxRelay with its own \
             spec.{}, or delete the other relay.",
            c.object.as_str(),
            c.name,
            c.namespace,
            c.holder,
            field(c.object),
        ),
    )
}

fn field(o: Object) -> &'static str {
    match o {
        Object::Slot => "replication.slotName (the name cannot change)",
        Object::Publication => "replication.publicationName (the name cannot change)",
        Object::EmitFunction => "outbox.messages.function",
        Object::PolledTable => "outbox.table (one polling relay per table)",
    }
}

/// A refusal of the binding, as a condition problem.
pub fn refusal(relay: &OutboxRelay, target: &DatabaseTarget, r: &Refusal) -> Problem {
    let last = relay
        .status
        .as_ref()
        .and_then(|s| s.slot.as_ref())
        .and_then(|s| s.confirmed_flush_lsn.clone());
    let since = match &last {
        Some(lsn) => format!("after its last confirmed position {lsn}"),
        None => "since it was created".to_string(),
    };
    // Messages have no copy outside the lost WAL: only the applications can tell what to re-emit.
    let compare = match &target.messages {
        None => format!("Compare the outbox table {} with the topic", target.table.unquoted()),
        Some(m) => format!(
            "Messages with prefix {:?} have no copy outside the lost WAL: compare the applications' records with the topic",
            m.prefix
        ),
    };
    let todo = format!(
        "{compare} for events committed in that range and re-publish any that are missing, then set the annotation \
         {}=<any new value> to create a new slot at the current WAL position. The operator does not create one on \
         its own.",
        annotations::RECREATE_SLOT
    );
    match r {
        Refusal::Conflict { object, name, holder } => {
            let whose = match holder {
                Holder::Relay { namespace, name, uid } => {
                    format!("belongs to OutboxRelay {namespace}/{name} (uid {uid})")
                }
                Holder::Unknown => "exists, but no OutboxRelay owns it (it has no ownership record: made by hand, \
                                    by another tool, or kept by a relay deleted with cleanupPolicy Retain)"
                    .to_string(),
            };
            let way_out = match holder {
                Holder::Relay { .. } => format!(
                    "Create a new OutboxRelay with its own spec.{}, or delete the other relay.",
                    field(*object)
                ),
                Holder::Unknown => format!(
                    "If it is meant for this relay, set the annotation {}=\"true\" to take it over; otherwise \
                     create a new OutboxRelay with another spec.{}.",
                    annotations::ADOPT,
                    field(*object)
                ),
            };
            Problem::new(
                reasons::CONFLICT,
                format!(
                    "The {} {name:?} {whose}; this relay does not touch it and its worker is scaled to zero. \
                     {way_out}",
                    object.as_str()
                ),
            )
        }
        Refusal::Lost { loss, recorded } => {
            let what = match loss {
                Loss::SlotGone => format!(
                    "Replication slot {:?} (created at LSN {} on system {}) no longer exists",
                    recorded.slot, recorded.slot_created_lsn, recorded.system_identifier
                ),
                Loss::WalRemoved => format!(
                    "Replication slot {:?} lost WAL it still needed (wal_status lost: the server removed it, see \
                     max_slot_wal_keep_size) and cannot stream any more",
                    recorded.slot
                ),
                Loss::PublicationGone => format!(
                    "Publication {:?} was dropped while replication slot {:?} still needed it; events written while \
                     it was missing cannot be decoded",
                    recorded.publication, recorded.slot
                ),
            };
            Problem::new(
                reasons::SLOT_LOST,
                format!("{what}: events committed {since} may never have reached Kafka. {todo}"),
            )
        }
        Refusal::DatabaseChanged { recorded, current } => Problem::new(
            reasons::DATABASE_CHANGED,
            format!(
                "The server at {}:{} is not the one replication slot {:?} was made on (system identifier {} then, \
                 {current} now: restored from a backup, or another cluster). The slot and any events it had not \
                 relayed {since} stay on the old server. {todo}",
                relay.spec.database.host, relay.spec.database.port, recorded.slot, recorded.system_identifier
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BindingStatus, OutboxRelayStatus, SlotStatus};
    use crate::controller::dereference::Dereferenced;
    use crate::controller::validate;

    fn target() -> DatabaseTarget {
        validate::validate(&OutboxRelay::test(), &Dereferenced::test(), "img")
            .unwrap()
            .database
    }

    fn recorded() -> BindingStatus {
        BindingStatus {
            slot: "outbox_shop_orders".into(),
            publication: "outbox_shop_orders".into(),
            system_identifier: "7301".into(),
            database: "orders".into(),
            slot_created_lsn: "0/100".into(),
            ..BindingStatus::default()
        }
    }

    #[test]
    fn a_lost_slot_says_from_where_events_may_be_missing_and_what_to_do() {
        let mut r = OutboxRelay::test();
        r.status = Some(OutboxRelayStatus {
            slot: Some(SlotStatus {
                name: "outbox_shop_orders".into(),
                confirmed_flush_lsn: Some("0/5A0".into()),
                ..SlotStatus::default()
            }),
            ..OutboxRelayStatus::default()
        });
        let p = refusal(
            &r,
            &target(),
            &Refusal::Lost {
                loss: Loss::SlotGone,
                recorded: recorded(),
            },
        );
        assert_eq!(p.reason, "SlotLost");
        for want in [
            "\"outbox_shop_orders\"",
            "created at LSN 0/100",
            "after its last confirmed position 0/5A0",
            "outbox.dev/recreate-slot",
            "public.outbox",
            "does not create one on its own",
        ] {
            assert!(p.message.contains(want), "{want:?} missing in {}", p.message);
        }
    }

    #[test]
    fn conflicts_name_the_other_relay_or_say_how_to_adopt() {
        let p = refusal(
            &OutboxRelay::test(),
            &target(),
            &Refusal::Conflict {
                object: Object::Publication,
                name: "shared_pub".into(),
                holder: Holder::Relay {
                    namespace: "team-a".into(),
                    name: "orders".into(),
                    uid: "u1".into(),
                },
            },
        );
        assert_eq!(p.reason, "Conflict");
        assert!(
            p.message.contains("OutboxRelay team-a/orders (uid u1)"),
            "{}",
            p.message
        );
        assert!(p.message.contains("publicationName"), "{}", p.message);
        let p = refusal(
            &OutboxRelay::test(),
            &target(),
            &Refusal::Conflict {
                object: Object::Slot,
                name: "s".into(),
                holder: Holder::Unknown,
            },
        );
        assert!(p.message.contains("outbox.dev/adopt=\"true\""), "{}", p.message);
        let c = cache_conflict(&CacheConflict {
            object: Object::Slot,
            name: "s".into(),
            namespace: "team-a".into(),
            holder: "orders".into(),
        });
        assert!(c.message.contains("OutboxRelay team-a/orders") && c.message.contains("slotName"));
    }

    #[test]
    fn another_server_is_database_changed() {
        let p = refusal(
            &OutboxRelay::test(),
            &target(),
            &Refusal::DatabaseChanged {
                recorded: recorded(),
                current: "9999".into(),
            },
        );
        assert_eq!(p.reason, "DatabaseChanged");
        assert!(p.message.contains("7301 then, 9999 now"), "{}", p.message);
    }
}
