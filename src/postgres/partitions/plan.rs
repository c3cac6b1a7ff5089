//! The pure core of partition management: given the clock, the partitions that
//! exist, what was recorded on detached ones and the slot's confirmed position,
//! which partitions to create, detach, mark and drop.
//!
//! The rule that keeps every committed event (docs/architecture.md):
//! 1. A partition whose range could still receive rows (its upper bound plus the
//!    grace is after now) is never detached, whatever the retention says.
//! 2. A partition is detached first. A row can only land in an attached partition,
//!    and a detach waits for every transaction writing into it, so every row the
//!    partition will ever hold was committed before the detach committed.
//! 3. The WAL position right after the detach is recorded on the detached table.
//! 4. It is dropped only when the slot's `confirmed_flush_lsn` is at or past that
//!    record: the relay then confirmed (delivered or parked) every transaction
//!    that committed before the detach, so every row in it.
//!
//! 5. A partition whose range starts before the slot was created (less the grace)
//!    is never retired: it may hold rows committed before the slot existed, which
//!    this slot never streamed (a first install's old rows, or those of the window
//!    a lost slot left before it was recreated). Its rows may be the only copy of
//!    such events; a DBA drops it by hand after checking.
//!
//! A detached table without a recorded position (the operator stopped between the
//! detach and the record) gets one recorded now: any later position is an upper
//! bound too, so late recording only delays the drop.

use crate::relay::lsn::Lsn;

/// One partition (or a detached former one) as read from the catalog, bounds in
/// seconds since 1970 (UTC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub from: i64,
    pub to: i64,
    pub state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Attached,
    /// Detached by the operator; `lsn` is the recorded position, if any yet.
    Detached {
        lsn: Option<Lsn>,
    },
}

/// What the operator was asked for, in seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub interval: i64,
    pub premake: u32,
    pub retention: i64,
    /// Time after a range's end during which a late row may still arrive (clock
    /// skew between application hosts, a transaction that took a timestamp early).
    pub grace: i64,
}

/// One step, in the order [`plan`] lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create {
        from: i64,
        to: i64,
    },
    Detach {
        name: String,
    },
    /// Record the current WAL position on a detached table that has none.
    RecordLsn {
        name: String,
    },
    Drop {
        name: String,
    },
}

/// A detached partition that may not be dropped yet, and why (for status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub name: String,
    pub detached_at: Option<Lsn>,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub waiting: Vec<Waiting>,
}

/// Start of the interval holding `t`.
pub fn floor(t: i64, interval: i64) -> i64 {
    t.div_euclid(interval) * interval
}

/// What the slot says, for [`plan`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotFacts {
    /// `confirmed_flush_lsn`; `None`: no slot, or it never confirmed anything (then
    /// nothing is dropped).
    pub confirmed: Option<Lsn>,
    /// When the slot was created, seconds since 1970; `None`: unknown (an adopted
    /// slot), and then nothing is retired.
    pub created_at: Option<i64>,
}

/// The decision.
pub fn plan(now: i64, policy: &Policy, existing: &[Partition], slot: SlotFacts) -> Plan {
    let confirmed = slot.confirmed;
    let mut out = Plan::default();
    let attached: Vec<&Partition> = existing.iter().filter(|p| p.state == State::Attached).collect();

    // Upcoming: the current interval and `premake` more, unless some attached
    // partition already overlaps that range (a DBA's own, or ours).
    let start = floor(now, policy.interval);
    for i in 0..=i64::from(policy.premake) {
        let (from, to) = (start + i * policy.interval, start + (i + 1) * policy.interval);
        if !attached.iter().any(|p| p.from < to && from < p.to) {
            out.steps.push(Step::Create { from, to });
        }
    }

    // Retired: ranges that ended long enough ago, and can receive nothing.
    for p in &attached {
        let closed = p.to.saturating_add(policy.grace) <= now;
        let expired = p.to.saturating_add(policy.retention) <= now;
        if !(closed && expired) {
            continue;
        }
        match slot.created_at {
            Some(created) if p.from >= created.saturating_sub(policy.grace) => {
                out.steps.push(Step::Detach { name: p.name.clone() })
            }
            created => out.waiting.push(Waiting {
                name: p.name.clone(),
                detached_at: None,
                reason: match created {
                    Some(_) => "past retention but kept: its range starts before the relay's slot was created, so it may hold events the slot never streamed; drop it by hand after checking".into(),
                    None => "past retention but kept: the slot's creation time is unknown (an adopted slot), so it may hold events the slot never streamed; drop it by hand after checking".into(),
                },
            }),
        }
    }

    for p in existing {
        let State::Detached { lsn } = p.state else { continue };
        match (lsn, confirmed) {
            (None, _) => {
                out.steps.push(Step::RecordLsn { name: p.name.clone() });
                out.waiting.push(Waiting {
                    name: p.name.clone(),
                    detached_at: None,
                    reason: "detached; the position after the detach is being recorded".into(),
                });
            }
            (Some(at), Some(c)) if c >= at => out.steps.push(Step::Drop { name: p.name.clone() }),
            (Some(at), c) => out.waiting.push(Waiting {
                name: p.name.clone(),
                detached_at: Some(at),
                reason: match c {
                    Some(c) => format!("the slot confirmed {c}; the partition's events end before {at}"),
                    None => format!("the slot has confirmed nothing; the partition's events end before {at}"),
                },
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600;

    fn policy() -> Policy {
        Policy {
            interval: H,
            premake: 2,
            retention: 2 * H,
            grace: 300,
        }
    }

    fn attached(name: &str, from_h: i64) -> Partition {
        Partition {
            name: name.into(),
            from: from_h * H,
            to: (from_h + 1) * H,
            state: State::Attached,
        }
    }

    /// A slot created at 00:00 that confirmed `lsn`.
    fn slot(lsn: Option<u64>) -> SlotFacts {
        SlotFacts {
            confirmed: lsn.map(Lsn::new),
            created_at: Some(0),
        }
    }

    fn detached(name: &str, lsn: Option<u64>) -> Partition {
        Partition {
            name: name.into(),
            from: 0,
            to: H,
            state: State::Detached { lsn: lsn.map(Lsn::new) },
        }
    }

    #[test]
    fn an_empty_table_gets_the_current_and_upcoming_partitions() {
        let now = 10 * H + 42;
        let p = plan(now, &policy(), &[], slot(None));
        assert_eq!(
            p.steps,
            [10, 11, 12].map(|h| Step::Create {
                from: h * H,
                to: (h + 1) * H
            })
        );
    }

    #[test]
    fn existing_or_overlapping_ranges_are_not_created_again() {
        // A DBA's daily partition covers hours 0..24: nothing to create inside it.
        let daily = Partition {
            name: "dba_day".into(),
            from: 0,
            to: 24 * H,
            state: State::Attached,
        };
        let p = plan(10 * H, &policy(), &[daily], slot(None));
        assert!(p.steps.is_empty(), "{p:?}");
        let p = plan(10 * H, &policy(), &[attached("a", 10), attached("b", 12)], slot(None));
        assert_eq!(
            p.steps,
            [Step::Create {
                from: 11 * H,
                to: 12 * H
            }]
        );
    }

    #[test]
    fn detaches_only_what_ended_past_retention_and_grace() {
        let parts = [
            attached("h7", 7),
            attached("h8", 8),
            attached("h9", 9),
            attached("h10", 10),
        ];
        // At 11:00, h8 ended 2h ago (= retention): detach; h9 ended 1h ago: keep.
        let p = plan(11 * H, &policy(), &parts, slot(None));
        let detached: Vec<_> = p.steps.iter().filter(|s| matches!(s, Step::Detach { .. })).collect();
        assert_eq!(
            detached,
            [&Step::Detach { name: "h7".into() }, &Step::Detach { name: "h8".into() }]
        );
    }

    #[test]
    fn a_range_that_may_still_receive_rows_is_never_detached_even_with_zero_retention() {
        let zero = Policy {
            retention: 0,
            ..policy()
        };
        // h9 ended at 10:00; within the 5-minute grace it stays attached.
        let parts = [attached("h9", 9), attached("h10", 10)];
        let p = plan(10 * H + 299, &zero, &parts, slot(None));
        assert!(!p.steps.iter().any(|s| matches!(s, Step::Detach { .. })), "{p:?}");
        let p = plan(10 * H + 300, &zero, &parts, slot(None));
        assert!(p.steps.contains(&Step::Detach { name: "h9".into() }), "{p:?}");
        // The current partition never, whatever the clock says about retention.
        assert!(!p.steps.contains(&Step::Detach { name: "h10".into() }));
    }

    #[test]
    fn drops_only_once_the_slot_confirmed_the_detach_position() {
        let parts = [detached("old", Some(0x5000))];
        for confirmed in [None, Some(Lsn::new(0x4fff))] {
            let p = plan(
                10 * H,
                &policy(),
                &parts,
                SlotFacts {
                    confirmed,
                    created_at: Some(0),
                },
            );
            assert!(!p.steps.iter().any(|s| matches!(s, Step::Drop { .. })), "{p:?}");
            assert_eq!(p.waiting.len(), 1);
            assert_eq!(p.waiting[0].detached_at, Some(Lsn::new(0x5000)));
        }
        for confirmed in [0x5000, 0x9000] {
            let p = plan(10 * H, &policy(), &parts, slot(Some(confirmed)));
            assert!(p.steps.contains(&Step::Drop { name: "old".into() }), "{p:?}");
            assert!(p.waiting.is_empty());
        }
    }

    #[test]
    fn a_detached_table_without_a_record_gets_one_and_is_not_dropped() {
        let p = plan(10 * H, &policy(), &[detached("old", None)], slot(Some(u64::MAX)));
        assert!(p.steps.contains(&Step::RecordLsn { name: "old".into() }));
        assert!(!p.steps.iter().any(|s| matches!(s, Step::Drop { .. })));
        assert_eq!(p.waiting[0].name, "old");
    }

    #[test]
    fn attached_partitions_are_never_dropped() {
        let parts = [attached("h1", 1), attached("h2", 2)];
        let p = plan(100 * H, &policy(), &parts, slot(Some(u64::MAX)));
        assert!(!p.steps.iter().any(|s| matches!(s, Step::Drop { .. })), "{p:?}");
    }

    #[test]
    fn partitions_older_than_the_slot_are_kept_and_said_so() {
        let parts = [attached("h1", 1), attached("h2", 2), attached("h3", 3)];
        // The slot was created at 02:30: hour 1 predates it, hour 2 began before it
        // too (rows from 02:00 to 02:30 were never streamed), hour 3 is after.
        let facts = SlotFacts {
            confirmed: None,
            created_at: Some(2 * H + 1_800),
        };
        let p = plan(100 * H, &policy(), &parts, facts);
        assert_eq!(p.steps.iter().filter(|s| matches!(s, Step::Detach { .. })).count(), 1);
        assert!(p.steps.contains(&Step::Detach { name: "h3".into() }), "{p:?}");
        let kept: Vec<_> = p.waiting.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(kept, ["h1", "h2"]);
        // Unknown creation: nothing retired.
        let p = plan(100 * H, &policy(), &parts, SlotFacts::default());
        assert!(!p.steps.iter().any(|s| matches!(s, Step::Detach { .. })), "{p:?}");
        assert_eq!(p.waiting.len(), 3);
    }

    #[test]
    fn floor_aligns_to_utc_intervals() {
        assert_eq!(floor(86_400 + 5, 86_400), 86_400);
        assert_eq!(floor(-1, H), -H);
    }
}
