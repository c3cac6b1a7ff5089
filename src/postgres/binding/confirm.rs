//! The steady state confirmed from a shared snapshot of the database, with no
//! statement of the relay's own (see `controller::steady`).

use super::marker::Ownership;
use super::{Bound, Intent, SlotStep, Target, decide, marker_for};
use crate::postgres::snapshot::Snapshot;

/// What [`bind`] would leave, when a shared [`Snapshot`] shows that it would change
/// nothing: the publication lists exactly the table, the slot is there and usable,
/// [`decide`] keeps it as it is, and the ownership record is already what `bind`
/// would write. `None` for anything else (including a refusal or a loss): those are
/// decided again on a fresh read of this relay's objects, never on a shared one.
pub fn confirm(t: &Target<'_>, snapshot: &Snapshot, intent: &Intent) -> Option<Bound> {
    if t.tableless || !snapshot.replication_possible() {
        return None;
    }
    let publication = snapshot.publication(t.publication)?;
    let slot = snapshot.slot(t.slot)?;
    if !publication.is_exactly(t.table) || !slot.usable_in(&snapshot.database) {
        return None;
    }
    let obs = snapshot.observation(t);
    let steps = decide(t.owner, t.slot, t.publication, &obs, intent).ok()?;
    let SlotStep::Keep { identity } = steps.slot else {
        return None;
    };
    if steps.take.is_some() || steps.echo_recreate.is_some() {
        return None;
    }
    let recorded = obs.publication.as_ref().and_then(Ownership::marker);
    if recorded != Some(&marker_for(t, &obs.system_identifier, Some(&identity))) {
        return None;
    }
    Some(Bound {
        identity,
        slot: obs.slot,
        take: None,
        changed: false,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::api::BindingStatus;
    use crate::postgres::binding::Owner;
    use crate::postgres::binding::marker::Marker;
    use crate::postgres::objects::PublicationState;
    use crate::postgres::snapshot::{PublicationRow, SlotRow};
    use crate::postgres::{QualifiedTable, SlotInfo};

    const SLOT: &str = "outbox_shop_orders";
    const PUBLICATION: &str = "outbox_shop_orders";

    fn owner() -> Owner {
        Owner {
            uid: "uid-me".into(),
            namespace: "shop".into(),
            name: "orders".into(),
        }
    }

    fn table() -> QualifiedTable {
        QualifiedTable {
            schema: "public".into(),
            name: "outbox".into(),
        }
    }

    fn recorded() -> BindingStatus {
        BindingStatus {
            slot: SLOT.into(),
            publication: PUBLICATION.into(),
            system_identifier: "7301".into(),
            database: "app".into(),
            slot_created_lsn: "0/100".into(),
            slot_created_at: None,
            recreated_for: None,
        }
    }

    fn marker(uid: &str) -> Marker {
        Marker {
            uid: uid.into(),
            namespace: "shop".into(),
            name: "orders".into(),
            slot: SLOT.into(),
            system_identifier: "7301".into(),
            slot_created_lsn: Some("0/100".into()),
            slot_created_at: None,
        }
    }

    fn publication(name: &str, owner: Marker) -> PublicationRow {
        PublicationRow {
            name: name.into(),
            ownership: Ownership::Marked(owner),
            state: PublicationState {
                all_tables: false,
                insert: true,
                update: false,
                delete: false,
                truncate: false,
                via_root: true,
                tables: vec![("public".into(), "outbox".into())],
                filtered: false,
                schemas: 0,
            },
        }
    }

    /// A database where the relay's objects are exactly as its last full pass left them.
    fn healthy() -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            wal_level: "logical".into(),
            in_recovery: false,
            can_replicate: true,
            system_identifier: "7301".into(),
            database: "app".into(),
            current_lsn: Some("0/300".into()),
            slots: vec![SlotRow {
                info: SlotInfo {
                    name: SLOT.into(),
                    plugin: Some("pgoutput".into()),
                    database: Some("app".into()),
                    active: true,
                    active_pid: Some(4242),
                    restart_lsn: Some("0/180".into()),
                    confirmed_flush_lsn: Some("0/200".into()),
                    wal_status: Some("reserved".into()),
                    safe_wal_size: None,
                    lag_bytes: Some(256),
                    retained_bytes: Some(384),
                },
                logical: true,
                temporary: false,
            }],
            publications: vec![publication(PUBLICATION, marker("uid-me"))],
        }
    }

    fn intent() -> Intent {
        Intent {
            recorded: Some(recorded()),
            ..Intent::default()
        }
    }

    fn check(s: &Snapshot, intent: &Intent) -> Option<Bound> {
        let owner = owner();
        let table = table();
        let t = Target {
            owner: &owner,
            slot: SLOT,
            publication: PUBLICATION,
            table: &table,
            tableless: false,
        };
        confirm(&t, s, intent)
    }

    #[test]
    fn the_steady_state_is_confirmed_with_the_slot_as_read() {
        let bound = check(&healthy(), &intent()).expect("confirmed");
        assert_eq!(bound.identity, recorded());
        assert_eq!(bound.slot.as_ref().and_then(|s| s.lag_bytes), Some(256));
        assert!(bound.take.is_none() && !bound.changed);
    }

    #[test]
    fn a_missing_or_unusable_slot_is_left_to_a_full_pass() {
        let mut gone = healthy();
        gone.slots.clear();
        assert!(check(&gone, &intent()).is_none(), "a loss is decided on a fresh read");

        let mut lost = healthy();
        lost.slots[0].info.wal_status = Some("lost".into());
        assert!(check(&lost, &intent()).is_none());

        let mut temporary = healthy();
        temporary.slots[0].temporary = true;
        assert!(check(&temporary, &intent()).is_none());

        let mut elsewhere = healthy();
        elsewhere.slots[0].info.database = Some("other".into());
        assert!(check(&elsewhere, &intent()).is_none());
    }

    #[test]
    fn a_publication_or_record_that_bind_would_change_is_left_to_a_full_pass() {
        let mut dropped = healthy();
        dropped.publications.clear();
        assert!(check(&dropped, &intent()).is_none());

        let mut widened = healthy();
        widened.publications[0]
            .state
            .tables
            .push(("public".into(), "orders".into()));
        assert!(check(&widened, &intent()).is_none());

        let mut updates = healthy();
        updates.publications[0].state.update = true;
        assert!(check(&updates, &intent()).is_none());

        let mut someone_elses = healthy();
        someone_elses.publications[0].ownership = Ownership::Marked(marker("uid-other"));
        assert!(check(&someone_elses, &intent()).is_none());

        // The record predates the slot's start position: bind would complete it.
        let mut pending = healthy();
        let half = Marker {
            slot_created_lsn: None,
            ..marker("uid-me")
        };
        pending.publications[0].ownership = Ownership::Marked(half);
        assert!(check(&pending, &intent()).is_none());
    }

    #[test]
    fn another_claim_on_the_slot_is_left_to_a_full_pass() {
        let mut claimed = healthy();
        let other = Marker {
            namespace: "billing".into(),
            ..marker("uid-other")
        };
        claimed.publications.push(publication("billing_outbox", other));
        // A full pass is what tells a live claimant from a gone one.
        assert!(check(&claimed, &intent()).is_none());
    }

    #[test]
    fn the_server_or_the_users_request_changing_is_left_to_a_full_pass() {
        let mut replica = healthy();
        replica.wal_level = "replica".into();
        assert!(check(&replica, &intent()).is_none());

        let mut standby = healthy();
        standby.in_recovery = true;
        standby.current_lsn = None;
        assert!(check(&standby, &intent()).is_none());

        let mut other_server = healthy();
        other_server.system_identifier = "9999".into();
        assert!(check(&other_server, &intent()).is_none());

        let recreate = Intent {
            recreate: Some("token-1".into()),
            ..intent()
        };
        assert!(check(&healthy(), &recreate).is_none());
    }
}
