use super::*;

const SLOT: &str = "outbox_shop_orders";
const PUBLICATION: &str = "outbox_shop_orders";

fn me() -> Owner {
    Owner {
        uid: "uid-me".into(),
        namespace: "shop".into(),
        name: "orders".into(),
    }
}

fn marker(uid: &str, ns: &str, name: &str, lsn: Option<&str>) -> Marker {
    Marker {
        uid: uid.into(),
        namespace: ns.into(),
        name: name.into(),
        slot: SLOT.into(),
        system_identifier: "7301".into(),
        slot_created_lsn: lsn.map(Into::into),
        slot_created_at: None,
    }
}

fn slot(wal_status: &str) -> SlotInfo {
    SlotInfo {
        name: SLOT.into(),
        plugin: Some("pgoutput".into()),
        database: Some("app".into()),
        active: false,
        active_pid: None,
        restart_lsn: Some("0/100".into()),
        confirmed_flush_lsn: Some("0/200".into()),
        wal_status: Some(wal_status.into()),
        safe_wal_size: None,
        lag_bytes: Some(0),
        retained_bytes: Some(0),
    }
}

fn obs(publication: Option<Ownership>, slot: Option<SlotInfo>) -> Observation {
    Observation {
        system_identifier: "7301".into(),
        database: "app".into(),
        current_lsn: "0/300".into(),
        publication,
        slot,
        slot_claims: Vec::new(),
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

fn known() -> Intent {
    Intent {
        recorded: Some(recorded()),
        ..Intent::default()
    }
}

fn ours() -> Option<Ownership> {
    Some(Ownership::Marked(marker("uid-me", "shop", "orders", Some("0/100"))))
}

fn run(o: &Observation, i: &Intent) -> Result<Steps, Refusal> {
    decide(&me(), SLOT, PUBLICATION, o, i)
}

#[test]
fn first_use_creates() {
    let s = run(&obs(None, None), &Intent::default()).unwrap();
    assert_eq!(s.slot, SlotStep::Create { drop_first: false });
    assert_eq!(s.take, Some(Take::Created));
}

#[test]
fn a_healthy_binding_is_kept() {
    let s = run(&obs(ours(), Some(slot("reserved"))), &known()).unwrap();
    assert_eq!(s.slot, SlotStep::Keep { identity: recorded() });
    assert_eq!(s.take, None);
    // The record alone (status lost) identifies the slot as well.
    let s = run(&obs(ours(), Some(slot("reserved"))), &Intent::default()).unwrap();
    assert!(matches!(s.slot, SlotStep::Keep { identity } if identity.slot_created_lsn == "0/100"));
}

#[test]
fn a_vanished_slot_is_lost_not_recreated() {
    let e = run(&obs(ours(), None), &known()).unwrap_err();
    assert_eq!(
        e,
        Refusal::Lost {
            loss: Loss::SlotGone,
            recorded: recorded()
        }
    );
    // Known from the record only (status gone): still a loss.
    let e = run(&obs(ours(), None), &Intent::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Refusal::Lost {
                loss: Loss::SlotGone,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn lost_wal_and_a_dropped_publication_are_losses() {
    let e = run(&obs(ours(), Some(slot("lost"))), &known()).unwrap_err();
    assert!(
        matches!(
            e,
            Refusal::Lost {
                loss: Loss::WalRemoved,
                ..
            }
        ),
        "{e:?}"
    );
    let e = run(&obs(None, Some(slot("reserved"))), &known()).unwrap_err();
    assert!(
        matches!(
            e,
            Refusal::Lost {
                loss: Loss::PublicationGone,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn only_an_explicit_request_recreates() {
    let mut i = known();
    i.recreate = Some("2026-12-02".into());
    let s = run(&obs(ours(), None), &i).unwrap();
    assert_eq!(s.slot, SlotStep::Create { drop_first: false });
    assert_eq!(
        s.take,
        Some(Take::Recreated {
            token: "2026-12-02".into(),
            lost: recorded()
        })
    );
    assert_eq!(s.echo_recreate.as_deref(), Some("2026-12-02"));
    // A slot whose WAL is gone is dropped first.
    let s = run(&obs(ours(), Some(slot("lost"))), &i).unwrap();
    assert_eq!(s.slot, SlotStep::Create { drop_first: true });
}

#[test]
fn a_request_while_healthy_is_only_acknowledged() {
    let mut i = known();
    i.recreate = Some("t1".into());
    let s = run(&obs(ours(), Some(slot("reserved"))), &i).unwrap();
    assert!(matches!(s.slot, SlotStep::Keep { .. }));
    assert_eq!(
        s.echo_recreate.as_deref(),
        Some("t1"),
        "echoed, so it cannot fire on a later loss"
    );
}

#[test]
fn another_server_is_database_changed() {
    let mut o = obs(ours(), Some(slot("reserved")));
    o.system_identifier = "9999".into();
    let e = run(&o, &known()).unwrap_err();
    assert_eq!(
        e,
        Refusal::DatabaseChanged {
            recorded: recorded(),
            current: "9999".into()
        }
    );
    let mut i = known();
    i.recreate = Some("t".into());
    let mut o = obs(None, None);
    o.system_identifier = "9999".into();
    assert_eq!(run(&o, &i).unwrap().slot, SlotStep::Create { drop_first: false });
    // A slot of the same name on the new server is not ours to drop.
    let mut o = obs(None, Some(slot("reserved")));
    o.system_identifier = "9999".into();
    assert!(matches!(
        run(&o, &i).unwrap_err(),
        Refusal::Conflict {
            object: Object::Slot,
            holder: Holder::Unknown,
            ..
        }
    ));
}

#[test]
fn another_relays_publication_is_never_taken() {
    let theirs = Some(Ownership::Marked(marker(
        "uid-other",
        "team-b",
        "payments",
        Some("0/50"),
    )));
    let e = run(&obs(theirs.clone(), None), &Intent::default()).unwrap_err();
    assert_eq!(
        e,
        Refusal::Conflict {
            object: Object::Publication,
            name: PUBLICATION.into(),
            holder: Holder::Relay {
                namespace: "team-b".into(),
                name: "payments".into(),
                uid: "uid-other".into()
            }
        }
    );
    // Adopt alone does not take it from a relay that still exists...
    let i = Intent {
        adopt: true,
        ..Intent::default()
    };
    assert!(run(&obs(theirs.clone(), None), &i).is_err());
    // ...but does once that relay is gone (deleted with Retain).
    let i = Intent {
        adopt: true,
        gone_owners: ["uid-other".to_string()].into(),
        ..Intent::default()
    };
    let s = run(&obs(theirs, Some(slot("reserved"))), &i).unwrap();
    assert_eq!(
        s.take,
        Some(Take::Adopted {
            from: "team-b/payments".into()
        })
    );
    assert!(matches!(s.slot, SlotStep::Keep { .. }));
}

#[test]
fn another_relays_slot_is_never_taken() {
    let mut o = obs(None, Some(slot("reserved")));
    o.slot_claims = vec![marker("uid-other", "team-b", "payments", Some("0/50"))];
    let e = run(&o, &Intent::default()).unwrap_err();
    assert!(
        matches!(&e, Refusal::Conflict { object: Object::Slot, holder: Holder::Relay { name, .. }, .. } if name == "payments"),
        "{e:?}"
    );
    // Even when the slot is missing: the other relay would lose its events.
    o.slot = None;
    assert!(run(&o, &Intent::default()).is_err());
}

#[test]
fn unowned_objects_need_adopt() {
    let e = run(&obs(Some(Ownership::Unmarked), None), &Intent::default()).unwrap_err();
    assert!(matches!(
        e,
        Refusal::Conflict {
            object: Object::Publication,
            holder: Holder::Unknown,
            ..
        }
    ));
    let e = run(&obs(None, Some(slot("reserved"))), &Intent::default()).unwrap_err();
    assert!(matches!(
        e,
        Refusal::Conflict {
            object: Object::Slot,
            holder: Holder::Unknown,
            ..
        }
    ));
    let i = Intent {
        adopt: true,
        ..Intent::default()
    };
    let s = run(
        &obs(Some(Ownership::Foreign("made by hand".into())), Some(slot("reserved"))),
        &i,
    )
    .unwrap();
    assert!(matches!(s.take, Some(Take::Adopted { .. })));
    assert!(
        matches!(&s.slot, SlotStep::Keep { identity } if identity.slot_created_lsn == "0/200"),
        "an adopted slot's start is its confirmed position: {s:?}"
    );
}

#[test]
fn objects_of_an_older_operator_are_recorded() {
    let i = Intent {
        legacy: true,
        ..Intent::default()
    };
    let s = run(&obs(Some(Ownership::Unmarked), Some(slot("reserved"))), &i).unwrap();
    assert_eq!(s.take, Some(Take::Recorded));
    assert!(matches!(s.slot, SlotStep::Keep { .. }));
    // Its slot existed: gone now is a loss, not a fresh start.
    let e = run(&obs(Some(Ownership::Unmarked), None), &i).unwrap_err();
    assert!(
        matches!(
            e,
            Refusal::Lost {
                loss: Loss::SlotGone,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_half_written_record_of_ours_keeps_the_slot() {
    let pending = Some(Ownership::Marked(marker("uid-me", "shop", "orders", None)));
    // The slot was created after the record; the start position never got written.
    let s = run(&obs(pending.clone(), Some(slot("reserved"))), &Intent::default()).unwrap();
    assert!(matches!(s.slot, SlotStep::Keep { .. }));
    // The record was written but the slot never created: create it now.
    let s = run(&obs(pending, None), &Intent::default()).unwrap();
    assert_eq!(s.slot, SlotStep::Create { drop_first: false });
}

#[test]
fn a_gone_owners_leftover_claim_does_not_block_an_adopted_slot() {
    let mut o = obs(ours(), Some(slot("reserved")));
    o.slot_claims = vec![marker("uid-old", "shop", "orders-v1", Some("0/50"))];
    let i = Intent {
        gone_owners: ["uid-old".to_string()].into(),
        ..known()
    };
    assert!(run(&o, &i).is_ok());
}
