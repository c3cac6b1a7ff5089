//! Unit tests of the delivery core: one test per rule (see the module docs).

use super::*;

const LIMIT: usize = 1000;

fn cfg(policy: PoisonPolicy) -> CoreConfig {
    CoreConfig {
        policy,
        dead_letter_topic: Some(Arc::from("dlq")),
        max_message_bytes: LIMIT,
        delete_rows: false,
        skip: None,
        park_table: Arc::from("public.outbox_parked"),
    }
}

fn record(id: &str, key: &str, payload: usize) -> OutboxRecord {
    OutboxRecord {
        topic: Arc::from("events"),
        key: Some(Bytes::copy_from_slice(key.as_bytes())),
        payload: Some(Bytes::from(vec![b'x'; payload])),
        event_id: Some(Bytes::copy_from_slice(id.as_bytes())),
        event_type: Some(Bytes::from_static(b"Created")),
        extra_headers: vec![("trace".into(), Bytes::from_static(b"t1"))],
        timestamp: PgTimestamp(0),
        partition: None,
    }
}

/// Drives a core and keeps every action, for assertions.
struct Drive {
    core: DeliveryCore,
    out: Vec<Action>,
}

impl Drive {
    fn new(cfg: CoreConfig) -> Self {
        Self {
            core: DeliveryCore::new(cfg, Lsn(10)),
            out: Vec::new(),
        }
    }
    fn step(&mut self, i: Input) -> Vec<Action> {
        let mut out = Vec::new();
        self.core.step(i, &mut out).expect("step");
        self.out.extend(out.iter().map(clone_action));
        out
    }
    fn begin(&mut self, commit_lsn: u64) {
        self.step(Input::Begin {
            commit_lsn: Lsn(commit_lsn),
            commit_time: PgTimestamp(0),
        });
    }
    fn commit(&mut self, end: u64) -> Vec<Action> {
        self.step(Input::Commit { end_lsn: Lsn(end) })
    }
    fn insert(&mut self, r: OutboxRecord) -> Vec<Action> {
        self.step(Input::Insert(Row::Event(r)))
    }
    fn confirmed(&self) -> u64 {
        self.core.confirmed().as_u64()
    }
}

fn clone_action(a: &Action) -> Action {
    match a {
        Action::Produce { tag, record } => Action::Produce {
            tag: *tag,
            record: record.clone(),
        },
        Action::DeadLetter { tag, topic, record } => Action::DeadLetter {
            tag: *tag,
            topic: topic.clone(),
            record: record.clone(),
        },
        Action::Park { tag, event } => Action::Park {
            tag: *tag,
            event: event.clone(),
        },
        Action::Acked { outcome, commit_time } => Action::Acked {
            outcome: *outcome,
            commit_time: *commit_time,
        },
        Action::Released {
            events,
            bytes,
            commit_time,
        } => Action::Released {
            events: *events,
            bytes: *bytes,
            commit_time: *commit_time,
        },
        Action::Confirm(l) => Action::Confirm(*l),
        Action::DeleteRows(ids) => Action::DeleteRows(ids.clone()),
        Action::Skipped(e) => Action::Skipped(e.clone()),
        Action::Stop(s) => Action::Stop(s.clone()),
    }
}

fn produced(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Produce { tag, .. } => Some(*tag),
            _ => None,
        })
        .collect()
}

fn one_tag(actions: &[Action]) -> usize {
    let tags = produced(actions);
    assert_eq!(tags.len(), 1, "{actions:?}");
    tags[0]
}

fn parks(actions: &[Action]) -> Vec<(usize, ParkedEvent)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Park { tag, event } => Some((*tag, (**event).clone())),
            _ => None,
        })
        .collect()
}

fn dead_letters(actions: &[Action]) -> Vec<(usize, FailedRecord)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::DeadLetter { tag, record, .. } => Some((*tag, record.clone())),
            _ => None,
        })
        .collect()
}

fn stops(actions: &[Action]) -> Vec<Stop> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn deleted(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteRows(ids) => Some(ids.iter().map(|b| String::from_utf8_lossy(b).into_owned())),
            _ => None,
        })
        .flatten()
        .collect()
}

fn header<'a>(r: &'a FailedRecord, k: &str) -> Option<&'a [u8]> {
    r.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_slice())
}

#[test]
fn records_are_produced_in_order_and_only_the_fully_acked_prefix_is_confirmed() {
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let a1 = one_tag(&d.insert(record("e1", "k", 10)));
    let a2 = one_tag(&d.insert(record("e2", "k", 10)));
    d.commit(101);
    d.begin(200);
    let b1 = one_tag(&d.insert(record("e3", "j", 10)));
    d.commit(201);
    let ids: Vec<_> = d
        .out
        .iter()
        .filter_map(|a| match a {
            Action::Produce { record, .. } => record.event_id.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(ids, ["e1", "e2", "e3"].map(|s| Bytes::from_static(s.as_bytes())));

    d.step(Input::Delivered { tag: b1 });
    d.step(Input::Delivered { tag: a2 });
    assert_eq!(d.confirmed(), 10, "e1 not acked: nothing confirmed");
    let out = d.step(Input::Delivered { tag: a1 });
    assert_eq!(d.confirmed(), 201);
    assert!(out.contains(&Action::Confirm(Lsn(201))), "{out:?}");
    assert_eq!(d.core.in_flight(), 0);
    assert_eq!(d.core.bytes_in_flight(), 0, "every report takes its bytes back");
}

#[test]
fn oversized_event_under_stop_stops_before_sending_anything_after_it() {
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let a = one_tag(&d.insert(record("ok", "k", 10)));
    d.commit(101);
    d.begin(200);
    let out = d.insert(record("big", "k", LIMIT + 1));
    let s = stops(&out);
    assert_eq!(s.len(), 1, "{out:?}");
    assert_eq!(s[0].kind, MESSAGE_TOO_LARGE);
    assert_eq!(s[0].event.to_string(), format!("big@{}", Lsn(200)));
    assert!(s[0].reason.contains("maxMessageBytes 1000"), "{}", s[0].reason);
    assert!(produced(&out).is_empty() && parks(&out).is_empty());

    // Later events of the same transaction and after are never produced.
    assert!(produced(&d.insert(record("after", "k", 10))).is_empty());
    d.commit(201);
    d.begin(300);
    assert!(produced(&d.insert(record("later", "k", 10))).is_empty());
    d.commit(301);
    // The prefix before the poison event is still confirmed; nothing past it.
    d.step(Input::Delivered { tag: a });
    assert_eq!(d.confirmed(), 101);
    d.step(Input::Keepalive { wal_end: Lsn(999) });
    assert_eq!(d.confirmed(), 101, "keepalives never move past an open transaction");
}

#[test]
fn a_broker_refusal_after_later_acks_of_the_same_key_confirms_nothing_past_it() {
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let poison = one_tag(&d.insert(record("p", "k", 10)));
    d.commit(101);
    d.begin(200);
    let later = one_tag(&d.insert(record("l", "k", 10)));
    d.commit(201);
    // Up to five requests per partition are in flight: the later one can be
    // acknowledged before the first one's refusal comes back.
    d.step(Input::Delivered { tag: later });
    let out = d.step(Input::Refused {
        tag: poison,
        kind: "NotAuthorized",
        reason: "Broker: Topic authorization failed".into(),
        record: failed_record(&record("p", "k", 10)),
    });
    let s = stops(&out);
    assert_eq!(s.len(), 1, "{out:?}");
    assert_eq!(
        s[0].event,
        EventRef {
            event_id: "p".into(),
            commit_lsn: Lsn(100)
        }
    );
    assert_eq!(d.confirmed(), 10);
    d.begin(300);
    assert!(
        produced(&d.insert(record("x", "k", 10))).is_empty(),
        "stopped: nothing more is sent"
    );
    d.commit(301);
    d.step(Input::Keepalive { wal_end: Lsn(900) });
    assert_eq!(d.confirmed(), 10, "the refused record is never acknowledged");
}

#[test]
fn oversized_event_under_dead_letter_is_parked_whole_and_a_pointer_goes_to_the_dlq() {
    let mut d = Drive::new(cfg(PoisonPolicy::DeadLetter));
    d.begin(100);
    let out = d.insert(record("big", "k", LIMIT + 1));
    assert!(stops(&out).is_empty());
    let p = parks(&out);
    let dl = dead_letters(&out);
    assert_eq!((p.len(), dl.len()), (1, 1), "{out:?}");
    let pos = |f: &dyn Fn(&Action) -> bool| out.iter().position(f);
    assert!(
        pos(&|a| matches!(a, Action::Park { .. })) < pos(&|a| matches!(a, Action::DeadLetter { .. })),
        "park first"
    );
    let parked = &p[0].1;
    assert_eq!(parked.kind, MESSAGE_TOO_LARGE);
    assert_eq!(
        parked.record.payload.as_ref().map(Vec::len),
        Some(LIMIT + 1),
        "the whole payload"
    );
    assert_eq!(header(&parked.record, "trace"), Some(&b"t1"[..]), "and every header");
    assert_eq!(parked.record.topic, "events");
    let pointer = &dl[0].1;
    assert_eq!(pointer.payload, None, "pointer only");
    assert_eq!(header(pointer, headers::ID), Some(&b"big"[..]));
    assert_eq!(header(pointer, headers::ERROR_KIND), Some(MESSAGE_TOO_LARGE.as_bytes()));
    assert_eq!(header(pointer, headers::ORIGINAL_TOPIC), Some(&b"events"[..]));
    assert_eq!(header(pointer, headers::PARKED_IN), Some(&b"public.outbox_parked"[..]));
    assert_eq!(header(pointer, "trace"), None, "extra headers stay in the park table");
    d.commit(101);

    // Both the park write and the pointer's ack are needed, in either order.
    d.step(Input::Delivered { tag: dl[0].0 });
    assert_eq!(d.confirmed(), 10, "not parked yet: not confirmed");
    let out = d.step(Input::Parked { tag: p[0].0 });
    assert_eq!(d.confirmed(), 101);
    assert!(out.contains(&Action::Acked {
        outcome: Outcome::Parked,
        commit_time: Some(PgTimestamp(0))
    }));
    assert_eq!(d.core.in_flight(), 0);
    assert_eq!(d.core.bytes_in_flight(), 0);
}

#[test]
fn park_alone_does_not_confirm_without_the_dead_letter_ack() {
    let mut d = Drive::new(cfg(PoisonPolicy::DeadLetter));
    d.begin(100);
    let out = d.insert(record("big", "k", LIMIT + 1));
    d.commit(101);
    d.step(Input::Parked { tag: parks(&out)[0].0 });
    assert_eq!(d.confirmed(), 10);
}

#[test]
fn broker_refusal_under_dead_letter_parks_and_dead_letters_the_whole_record() {
    let mut d = Drive::new(cfg(PoisonPolicy::DeadLetter));
    d.begin(100);
    let t = one_tag(&d.insert(record("e", "k", 10)));
    d.commit(101);
    let out = d.step(Input::Refused {
        tag: t,
        kind: "UnknownTopic",
        reason: "Broker: Unknown topic or partition".into(),
        record: failed_record(&record("e", "k", 10)),
    });
    let (p, dl) = (parks(&out), dead_letters(&out));
    assert_eq!((p.len(), dl.len()), (1, 1), "{out:?}");
    assert_eq!(
        dl[0].1.payload.as_ref().map(Vec::len),
        Some(10),
        "not a size problem: whole copy"
    );
    assert_eq!(
        d.core.in_flight(),
        2,
        "the refused record's slot went to the copy, plus the park"
    );
    d.step(Input::Parked { tag: p[0].0 });
    d.step(Input::Delivered { tag: dl[0].0 });
    assert_eq!(d.confirmed(), 101);
    assert_eq!(d.core.in_flight(), 0);
}

#[test]
fn a_refused_dead_letter_copy_stops_the_relay() {
    let mut d = Drive::new(cfg(PoisonPolicy::DeadLetter));
    d.begin(100);
    let out = d.insert(record("big", "k", LIMIT + 1));
    d.commit(101);
    let (p, dl) = (parks(&out), dead_letters(&out));
    d.step(Input::Parked { tag: p[0].0 });
    let out = d.step(Input::Refused {
        tag: dl[0].0,
        kind: "UnknownTopic",
        reason: "Broker: Unknown topic or partition".into(),
        record: dl[0].1.clone(),
    });
    let s = stops(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].kind, DEAD_LETTER_FAILED);
    assert_eq!(s[0].event.event_id, "big");
    assert_eq!(d.confirmed(), 10);
}

#[test]
fn unmapped_rows_stop_or_are_parked_with_every_column() {
    let row = serde_json::json!({"id": "u1", "headers": "[1,2]"});
    let unmapped = || {
        Input::Insert(Row::Unmapped {
            event_id: Some("u1".into()),
            row: row.clone(),
            kind: "InvalidHeaders",
            reason: "headers column of event u1 is not a JSON object".into(),
        })
    };
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let s = stops(&d.step(unmapped()));
    assert_eq!(s[0].kind, "InvalidHeaders");
    assert_eq!(s[0].event.to_string(), format!("u1@{}", Lsn(100)));

    let mut d = Drive::new(cfg(PoisonPolicy::DeadLetter));
    d.begin(100);
    let out = d.step(unmapped());
    let p = parks(&out);
    assert_eq!(p[0].1.row.as_ref(), Some(&row));
    let dl = dead_letters(&out);
    assert_eq!(dl[0].1.payload.as_deref(), Some(row.to_string().as_bytes()));
    d.commit(101);
    d.step(Input::Parked { tag: p[0].0 });
    d.step(Input::Delivered { tag: dl[0].0 });
    assert_eq!(d.confirmed(), 101);
}

#[test]
fn presend_refusals_follow_the_policy() {
    let refused = || {
        Input::Insert(Row::Refused {
            record: record("t", "k", 10),
            kind: "UnknownTopic",
            reason: "topic events does not exist".into(),
        })
    };
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let out = d.step(refused());
    assert_eq!(stops(&out)[0].kind, "UnknownTopic");
    assert!(produced(&out).is_empty(), "nothing reaches Kafka");
    let mut d = Drive::new(cfg(PoisonPolicy::DeadLetter));
    d.begin(100);
    let out = d.step(refused());
    assert_eq!((parks(&out).len(), dead_letters(&out).len()), (1, 1));
}

#[test]
fn a_skip_request_parks_exactly_the_named_event() {
    let mut c = cfg(PoisonPolicy::Stop);
    c.skip = Some(EventRef {
        event_id: "big".into(),
        commit_lsn: Lsn(200),
    });
    let mut d = Drive::new(c);
    d.begin(100);
    // Same id, another transaction: not the named event, so it still stops.
    let s = stops(&d.insert(record("big", "k", LIMIT + 1)));
    assert_eq!(s.len(), 1, "another transaction's event of the same id still stops");

    let mut c = cfg(PoisonPolicy::Stop);
    c.skip = Some(EventRef {
        event_id: "big".into(),
        commit_lsn: Lsn(200),
    });
    c.delete_rows = true;
    let mut d = Drive::new(c);
    d.begin(200);
    let out = d.insert(record("big", "k", LIMIT + 1));
    assert!(stops(&out).is_empty(), "{out:?}");
    let p = parks(&out);
    assert_eq!(p.len(), 1);
    assert!(p[0].1.skipped);
    assert_eq!(p[0].1.kind, MESSAGE_TOO_LARGE);
    assert!(out.contains(&Action::Skipped(EventRef {
        event_id: "big".into(),
        commit_lsn: Lsn(200)
    })));
    assert!(dead_letters(&out).is_empty(), "skip does not dead-letter");
    let next = one_tag(&d.insert(record("next", "k", 10)));
    d.commit(201);
    d.step(Input::Delivered { tag: next });
    assert_eq!(d.confirmed(), 10, "the park is pending");
    let out = d.step(Input::Parked { tag: p[0].0 });
    assert_eq!(d.confirmed(), 201);
    assert_eq!(deleted(&out), vec!["next".to_string()], "the skipped row is kept");
}

#[test]
fn a_skip_request_parks_the_named_event_before_it_is_sent() {
    // A broker refusal (here: not authorized) stopped the last session at "p";
    // the next session, given the skip request, never sends "p" at all.
    let mut c = cfg(PoisonPolicy::Stop);
    c.skip = Some(EventRef {
        event_id: "p".into(),
        commit_lsn: Lsn(100),
    });
    let mut d = Drive::new(c);
    d.begin(100);
    let out = d.insert(record("p", "k", 10));
    assert!(produced(&out).is_empty(), "{out:?}");
    let p = parks(&out);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1.kind, "Skipped");
    assert_eq!(p[0].1.record.payload.as_ref().map(Vec::len), Some(10));
    d.commit(101);
    d.step(Input::Parked { tag: p[0].0 });
    assert_eq!(d.confirmed(), 101);
    // The request names exactly one event: a later one with the same id is sent.
    d.begin(200);
    assert_eq!(produced(&d.insert(record("p", "k", 10))).len(), 1);
}

#[test]
fn relayed_row_deletion_lists_only_events_delivered_whole_after_confirmation() {
    let mut c = cfg(PoisonPolicy::DeadLetter);
    c.delete_rows = true;
    let mut d = Drive::new(c);
    d.begin(100);
    let ok = one_tag(&d.insert(record("ok", "k", 10)));
    let big = d.insert(record("big", "k", LIMIT + 1));
    let refused = one_tag(&d.insert(record("nope", "k", 10)));
    d.commit(101);
    let out = d.step(Input::Delivered { tag: ok });
    assert!(deleted(&out).is_empty(), "not confirmed yet");
    let out2 = d.step(Input::Refused {
        tag: refused,
        kind: "UnknownTopic",
        reason: "gone".into(),
        record: failed_record(&record("nope", "k", 10)),
    });
    let mut all = Vec::new();
    for (tag, _) in parks(&big).into_iter().chain(parks(&out2)) {
        all.extend(d.step(Input::Parked { tag }));
    }
    for (tag, _) in dead_letters(&big).into_iter().chain(dead_letters(&out2)) {
        all.extend(d.step(Input::Delivered { tag }));
    }
    assert_eq!(d.confirmed(), 101);
    assert_eq!(deleted(&all), vec!["ok".to_string()], "{all:?}");
}

#[test]
fn no_rows_are_deleted_when_stopped() {
    let mut c = cfg(PoisonPolicy::Stop);
    c.delete_rows = true;
    let mut d = Drive::new(c);
    d.begin(100);
    let ok = one_tag(&d.insert(record("ok", "k", 10)));
    d.insert(record("big", "k", LIMIT + 1));
    d.commit(101);
    d.step(Input::Delivered { tag: ok });
    assert!(deleted(&d.out).is_empty(), "its transaction is never confirmed");
}

#[test]
fn keepalives_confirm_only_with_nothing_open() {
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let t = one_tag(&d.insert(record("e", "k", 10)));
    d.commit(101);
    d.step(Input::Keepalive { wal_end: Lsn(500) });
    assert_eq!(d.confirmed(), 10);
    d.step(Input::Delivered { tag: t });
    let out = d.step(Input::Keepalive { wal_end: Lsn(500) });
    assert_eq!(out, vec![Action::Confirm(Lsn(500))]);
}

#[test]
fn released_transactions_report_their_events() {
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let t = one_tag(&d.insert(record("e", "k", 10)));
    d.commit(101);
    let out = d.step(Input::Delivered { tag: t });
    let size = record("e", "k", 10).size() as u64;
    assert!(out.contains(&Action::Released {
        events: 1,
        bytes: size,
        commit_time: PgTimestamp(0)
    }));
    // A transaction without outbox rows confirms at commit, reporting nothing.
    d.begin(200);
    let out = d.commit(201);
    assert_eq!(out, vec![Action::Confirm(Lsn(201))]);
}

#[test]
fn protocol_violations_are_errors() {
    let mut core = DeliveryCore::new(cfg(PoisonPolicy::Stop), Lsn(0));
    let mut out = Vec::new();
    assert!(
        core.step(Input::Insert(Row::Event(record("e", "k", 1))), &mut out)
            .is_err()
    );
    assert!(core.step(Input::Commit { end_lsn: Lsn(1) }, &mut out).is_err());
}

#[test]
fn event_refs_print_and_parse() {
    let r: EventRef = "a@b@0/16B3748".parse().expect("parse");
    assert_eq!(r.event_id, "a@b");
    assert_eq!(r.commit_lsn, "0/16B3748".parse::<Lsn>().expect("lsn"));
    assert_eq!(r.to_string().parse::<EventRef>(), Ok(r));
    assert!("no-lsn".parse::<EventRef>().is_err());
    assert!("@0/1".parse::<EventRef>().is_err());
    assert!("x@zz".parse::<EventRef>().is_err());
}

#[test]
fn after_a_stop_refused_reports_only_mark_their_records() {
    let mut d = Drive::new(cfg(PoisonPolicy::Stop));
    d.begin(100);
    let ok = one_tag(&d.insert(record("ok", "k", 10)));
    let poison = one_tag(&d.insert(record("p", "k", 10)));
    let purged = one_tag(&d.insert(record("q", "k", 10)));
    d.commit(101);
    let out = d.step(Input::Refused {
        tag: poison,
        kind: "NotAuthorized",
        reason: "denied".into(),
        record: failed_record(&record("p", "k", 10)),
    });
    assert_eq!(stops(&out).len(), 1);
    // A purged record reports a failure: counted as refused, no second stop, no park.
    let out = d.step(Input::Refused {
        tag: purged,
        kind: "KafkaError",
        reason: "Local: Purged in queue".into(),
        record: failed_record(&record("q", "k", 10)),
    });
    assert!(out.is_empty(), "{out:?}");
    d.step(Input::Delivered { tag: ok });
    assert_eq!(
        d.core.in_flight(),
        d.core.refused_in_flight(),
        "a drain has nothing left to wait for"
    );
    assert_eq!(d.confirmed(), 10);
}
