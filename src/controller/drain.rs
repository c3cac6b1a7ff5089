//! The pure core of a deletion with `cleanupPolicy: Delete`: may the slot be
//! dropped now, or must deletion wait for the worker to relay what was written
//! before it?
//!
//! The target is the server's WAL position when the deletion was first seen. The
//! slot may go when its confirmed position reached the target (every event before
//! the delete is in Kafka), or when no worker streams and the slot holds no outbox
//! event before the target (an idle relay's confirmed position can trail the WAL
//! with nothing of its own in between). Past `spec.drainTimeoutSeconds`, or with
//! `outbox.dev/force-delete`, it goes anyway, and what it held is named.

use std::time::Duration;

use crate::relay::lsn::Lsn;

/// What the cleanup pass knows about the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotFacts {
    pub active: bool,
    pub confirmed: Option<Lsn>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    /// `None`: the slot does not exist.
    pub slot: Option<SlotFacts>,
    pub target: Lsn,
    /// Outbox events the slot holds before the target, when it was peeked.
    pub pending: Option<u64>,
    pub forced: bool,
    pub elapsed: Duration,
    pub timeout: Duration,
}

/// Why the slot may be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// No slot to drain.
    NoSlot,
    /// Confirmed position at or past the target.
    Drained,
    /// No worker streams and no outbox event waits before the target.
    NothingPending,
    /// Forced or timed out with events still in the slot.
    GiveUp { forced: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Drop(Finish),
    /// Peek at the slot (possible only while no worker streams from it).
    Peek,
    /// Stop the worker and free the slot, then peek: deletion gives up on it.
    StopAndPeek,
    Wait,
}

pub fn step(f: &Facts) -> Step {
    let Some(slot) = f.slot else {
        return Step::Drop(Finish::NoSlot);
    };
    if slot.confirmed.is_some_and(|c| c >= f.target) {
        return Step::Drop(Finish::Drained);
    }
    let give_up = f.forced || f.elapsed >= f.timeout;
    match (f.pending, slot.active) {
        (Some(0), _) => Step::Drop(Finish::NothingPending),
        (Some(_), _) if give_up => Step::Drop(Finish::GiveUp { forced: f.forced }),
        (Some(_), _) => Step::Wait,
        (None, false) => Step::Peek,
        (None, true) if give_up => Step::StopAndPeek,
        (None, true) => Step::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            slot: Some(SlotFacts {
                active: true,
                confirmed: Some(Lsn::new(100)),
            }),
            target: Lsn::new(200),
            pending: None,
            forced: false,
            elapsed: Duration::from_secs(5),
            timeout: Duration::from_secs(600),
        }
    }

    #[test]
    fn a_streaming_worker_is_waited_for_until_it_passes_the_target() {
        assert_eq!(step(&facts()), Step::Wait);
        let mut f = facts();
        f.slot = Some(SlotFacts {
            active: true,
            confirmed: Some(Lsn::new(200)),
        });
        assert_eq!(step(&f), Step::Drop(Finish::Drained));
    }

    #[test]
    fn without_a_worker_the_slot_is_peeked_and_dropped_only_if_empty() {
        let mut f = facts();
        f.slot = Some(SlotFacts {
            active: false,
            confirmed: Some(Lsn::new(100)),
        });
        assert_eq!(step(&f), Step::Peek);
        f.pending = Some(0);
        assert_eq!(step(&f), Step::Drop(Finish::NothingPending));
        f.pending = Some(3);
        assert_eq!(
            step(&f),
            Step::Wait,
            "events wait: keep the slot until a worker or the timeout"
        );
    }

    #[test]
    fn timeout_and_force_end_the_wait_and_name_what_is_dropped() {
        let mut f = facts();
        f.elapsed = Duration::from_secs(600);
        assert_eq!(step(&f), Step::StopAndPeek, "active: stop the worker, then look");
        f.pending = Some(7);
        assert_eq!(step(&f), Step::Drop(Finish::GiveUp { forced: false }));
        let mut f = facts();
        f.forced = true;
        f.pending = Some(1);
        assert_eq!(step(&f), Step::Drop(Finish::GiveUp { forced: true }));
        // Force with nothing pending is simply drained.
        f.pending = Some(0);
        assert_eq!(step(&f), Step::Drop(Finish::NothingPending));
    }

    #[test]
    fn a_missing_slot_has_nothing_to_drain() {
        let mut f = facts();
        f.slot = None;
        assert_eq!(step(&f), Step::Drop(Finish::NoSlot));
    }
}
