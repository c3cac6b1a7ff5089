//! Collisions between relays, seen in the operator's cache before anything touches
//! PostgreSQL: two relays naming the same slot or publication in the same database,
//! or the same emit function with different message prefixes (each reconcile would
//! rewrite the function, and one application's events would carry the other relay's
//! prefix: passed over by its own relay, sent by the other to the wrong place).
//!
//! The relay that already holds the objects (its status records the binding) keeps
//! them; when neither does, the older one wins (then the smaller namespace/name), so
//! both sides reach the same verdict. The loser gets `Conflict` and its worker is
//! scaled to zero. Names that differ only in spelling of the host (an IP and a DNS
//! name of one server) slip past this check; the ownership records in PostgreSQL
//! ([`crate::postgres::binding`]) catch those.

use kube::ResourceExt;

use super::validate::object_names;
use crate::api::OutboxRelay;
use crate::postgres::binding::Object;

/// The relay that keeps the object this relay also names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConflict {
    pub object: Object,
    pub name: String,
    pub namespace: String,
    pub holder: String,
}

struct Claim {
    server: (String, i32, String),
    slot: String,
    publication: String,
    /// A tableless relay's emit function (lower case) and message prefix.
    function: Option<(String, String)>,
    /// A polling relay's table.
    polled: Option<String>,
    /// The status records the binding of exactly these objects.
    bound: bool,
    /// Sort key of "who came first": creation time, then namespace/name.
    seniority: (Option<i64>, String, String),
}

fn claim(r: &OutboxRelay) -> Claim {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let (slot, publication) = object_names(&ns, &name, &r.spec);
    let bound = r
        .status
        .as_ref()
        .and_then(|s| s.binding.as_ref())
        .is_some_and(|b| b.slot == slot && b.publication == publication);
    let db = &r.spec.database;
    let function = (r.spec.outbox.source == crate::api::source::OutboxSource::Messages).then(|| {
        let m = r.spec.outbox.messages.clone().unwrap_or_default();
        (m.function.to_ascii_lowercase(), m.prefix)
    });
    let polled = (r.spec.mode == crate::api::RelayMode::Polling).then(|| r.spec.outbox.table.clone());
    Claim {
        server: (db.host.to_ascii_lowercase(), db.port, db.database.clone()),
        slot,
        publication,
        function,
        polled,
        bound,
        seniority: (
            r.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            ns,
            name,
        ),
    }
}

/// The first relay among `others` that keeps an object `me` names too, if `me` is
/// the one that has to yield.
pub fn find<'a>(me: &OutboxRelay, others: impl IntoIterator<Item = &'a OutboxRelay>) -> Option<CacheConflict> {
    let mine = claim(me);
    let my_uid = me.uid();
    others
        .into_iter()
        .filter(|o| o.uid() != my_uid)
        .filter_map(|o| {
            let theirs = claim(o);
            if theirs.server != mine.server {
                return None;
            }
            let object = if theirs.slot == mine.slot {
                (Object::Slot, mine.slot.clone())
            } else if theirs.publication == mine.publication {
                (Object::Publication, mine.publication.clone())
            } else if let (Some((f, p)), Some((their_f, their_p))) = (&mine.function, &theirs.function)
                && f == their_f
                && p != their_p
            {
                (Object::EmitFunction, f.clone())
            } else if let (Some(t), Some(their_t)) = (&mine.polled, &theirs.polled)
                && t == their_t
            {
                (Object::PolledTable, t.clone())
            } else {
                return None;
            };
            let they_win = match (mine.bound, theirs.bound) {
                (false, true) => true,
                (true, false) => false,
                // Both claim to hold it: only PostgreSQL's records can tell.
                (true, true) => false,
                (false, false) => theirs.seniority < mine.seniority,
            };
            they_win.then(|| CacheConflict {
                object: object.0,
                name: object.1,
                namespace: theirs.seniority.1.clone(),
                holder: theirs.seniority.2.clone(),
            })
        })
        .next()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::{BindingStatus, OutboxRelayStatus};

    fn relay(ns: &str, name: &str, uid: &str, created: i64) -> OutboxRelay {
        let mut r = OutboxRelay::test();
        r.metadata.namespace = Some(ns.into());
        r.metadata.name = Some(name.into());
        r.metadata.uid = Some(uid.into());
        r.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap()));
        r
    }

    fn with_publication(mut r: OutboxRelay, p: &str) -> OutboxRelay {
        r.spec.replication.publication_name = Some(p.into());
        r
    }

    fn bound(mut r: OutboxRelay) -> OutboxRelay {
        let ns = r.namespace().unwrap();
        let (slot, publication) = object_names(&ns, &r.name_any(), &r.spec);
        r.status = Some(OutboxRelayStatus {
            binding: Some(BindingStatus {
                slot,
                publication,
                ..BindingStatus::default()
            }),
            ..OutboxRelayStatus::default()
        });
        r
    }

    #[test]
    fn the_younger_of_two_unbound_relays_yields() {
        let a = with_publication(relay("team-a", "orders", "a", 100), "shared_pub");
        let b = with_publication(relay("team-b", "orders", "b", 200), "shared_pub");
        assert_eq!(find(&a, [&b]), None, "the older one keeps going");
        let c = find(&b, [&a]).expect("the younger one yields");
        assert_eq!(c.object, Object::Publication);
        assert_eq!(c.name, "shared_pub");
        assert_eq!((c.namespace.as_str(), c.holder.as_str()), ("team-a", "orders"));
    }

    #[test]
    fn a_bound_relay_keeps_its_objects_whatever_its_age() {
        let old = with_publication(relay("team-a", "orders", "a", 100), "shared_pub");
        let holder = bound(with_publication(relay("team-b", "orders", "b", 200), "shared_pub"));
        assert!(find(&old, [&holder]).is_some());
        assert_eq!(find(&holder, [&old]), None);
    }

    #[test]
    fn same_slot_name_collides_too() {
        let mut a = relay("team-a", "x", "a", 100);
        a.spec.replication.slot_name = Some("one_slot".into());
        let mut b = relay("team-b", "y", "b", 200);
        b.spec.replication.slot_name = Some("one_slot".into());
        let c = find(&b, [&a]).unwrap();
        assert_eq!((c.object, c.name.as_str()), (Object::Slot, "one_slot"));
    }

    fn tableless(mut r: OutboxRelay, function: &str, prefix: &str) -> OutboxRelay {
        r.spec.outbox.source = crate::api::source::OutboxSource::Messages;
        r.spec.outbox.table = String::new();
        let mut m = r.spec.outbox.messages.clone().unwrap_or_default();
        m.function = function.into();
        m.prefix = prefix.into();
        r.spec.outbox.messages = Some(m);
        r
    }

    #[test]
    fn one_emit_function_with_two_prefixes_collides() {
        let a = tableless(relay("team-a", "orders", "a", 100), "public.outbox_emit", "orders");
        let b = tableless(relay("team-b", "billing", "b", 200), "PUBLIC.outbox_emit", "billing");
        assert_eq!(find(&a, [&b]), None, "the older one keeps its function");
        let c = find(&b, [&a]).expect("the younger one yields");
        assert_eq!(
            (c.object, c.name.as_str()),
            (Object::EmitFunction, "public.outbox_emit")
        );
        // Same function and prefix: the function's body is the same; no collision.
        let same = tableless(relay("team-c", "orders2", "c", 300), "public.outbox_emit", "orders");
        assert_eq!(find(&same, [&a]), None);
        // Different functions: none.
        let other = tableless(relay("team-d", "x", "d", 400), "public.billing_emit", "billing");
        assert_eq!(find(&other, [&a]), None);
    }

    #[test]
    fn two_pollers_of_one_table_collide() {
        let polling = |r: OutboxRelay| {
            let mut r = r;
            r.spec.mode = crate::api::RelayMode::Polling;
            r.spec.polling = Some(crate::api::PollingSpec::with_order_column("seq"));
            r
        };
        let a = polling(relay("team-a", "orders", "a", 100));
        let b = polling(relay("team-b", "orders", "b", 200));
        assert_eq!(find(&a, [&b]), None, "the older one keeps polling");
        let c = find(&b, [&a]).expect("the younger one yields");
        assert_eq!(
            (c.object, c.name.as_str()),
            (Object::PolledTable, a.spec.outbox.table.as_str())
        );
        // A replication relay of the same table reads the WAL, not the rows: no collision.
        let streaming = relay("team-c", "orders", "c", 50);
        assert_eq!(find(&b, [&streaming]), None);
    }

    #[test]
    fn other_databases_and_itself_never_collide() {
        let a = with_publication(relay("team-a", "orders", "a", 100), "shared_pub");
        let mut b = with_publication(relay("team-b", "orders", "b", 200), "shared_pub");
        b.spec.database.database = "other".into();
        assert_eq!(find(&b, [&a]), None);
        assert_eq!(find(&a, [&a]), None);
        // Host names compare without case.
        let mut c = with_publication(relay("team-c", "orders", "c", 300), "shared_pub");
        c.spec.database.host = a.spec.database.host.to_uppercase();
        assert!(find(&c, [&a]).is_some());
    }
}
