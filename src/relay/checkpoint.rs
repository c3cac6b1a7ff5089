//! Which LSN may be confirmed to PostgreSQL.
//!
//! The rule that makes the relay at-least-once: a transaction's end LSN is confirmed
//! only when Kafka acknowledged every record of that transaction *and of every
//! transaction before it*. Acks arrive out of order (different partitions, retries),
//! so transactions wait in a queue in commit order and the confirmable position is
//! the end of the longest fully acknowledged prefix.
//!
//! Pure bookkeeping, no I/O: the session feeds it and asks it.

use std::collections::VecDeque;

use super::lsn::Lsn;

/// Handle of one transaction in the tracker, carried by each of its records' acks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxnSeq(u64);

impl TxnSeq {
    /// For carrying the handle through an opaque integer (Kafka delivery tags).
    pub fn as_u64(self) -> u64 {
        self.0
    }
    pub fn from_u64(v: u64) -> Self {
        Self(v)
    }
}

#[derive(Debug)]
struct Txn<M> {
    /// Records produced but not yet acknowledged.
    pending: u32,
    /// False while records of the transaction are still being produced.
    committed: bool,
    /// Position after the commit record: confirming it means "never send this again".
    end_lsn: Lsn,
    /// Caller data released with the transaction (commit time, event ids to delete, ...).
    meta: M,
}

/// Tracks in-flight transactions in commit order.
#[derive(Debug)]
pub struct Checkpoints<M> {
    /// Sequence number of `txns[0]`.
    base: u64,
    txns: VecDeque<Txn<M>>,
    /// Highest LSN safe to confirm.
    confirmed: Lsn,
    /// Records produced and not yet acknowledged, over all transactions.
    in_flight: usize,
}

impl<M> Checkpoints<M> {
    /// Starts with `confirmed` as the position the stream resumed from.
    pub fn new(confirmed: Lsn) -> Self {
        Self {
            base: 0,
            txns: VecDeque::new(),
            confirmed,
            in_flight: 0,
        }
    }

    /// Opens a transaction (on Begin). Its records are added with [`Self::add_record`].
    pub fn begin(&mut self, meta: M) -> TxnSeq {
        let seq = self.base + self.txns.len() as u64;
        self.txns.push_back(Txn {
            pending: 0,
            committed: false,
            end_lsn: Lsn::ZERO,
            meta,
        });
        TxnSeq(seq)
    }

    /// Counts one more record of `txn` sent to Kafka.
    pub fn add_record(&mut self, txn: TxnSeq) {
        if let Some(t) = self.get_mut(txn) {
            t.pending += 1;
            self.in_flight += 1;
        }
    }

    /// A transaction's caller data while it is still tracked.
    pub fn meta(&self, txn: TxnSeq) -> Option<&M> {
        let idx = txn.0.checked_sub(self.base)?;
        self.txns.get(usize::try_from(idx).ok()?).map(|t| &t.meta)
    }

    /// Mutable access to a transaction's caller data while it is still tracked.
    pub fn meta_mut(&mut self, txn: TxnSeq) -> Option<&mut M> {
        self.get_mut(txn).map(|t| &mut t.meta)
    }

    /// Closes `txn` (on Commit) with its end LSN; returns what became confirmable.
    pub fn commit(&mut self, txn: TxnSeq, end_lsn: Lsn) -> Vec<M> {
        if let Some(t) = self.get_mut(txn) {
            t.committed = true;
            t.end_lsn = end_lsn;
        }
        self.release()
    }

    /// Records one Kafka acknowledgement for a record of `txn`; returns the
    /// transactions that became confirmed, oldest first.
    pub fn ack(&mut self, txn: TxnSeq) -> Vec<M> {
        if let Some(t) = self.get_mut(txn)
            && t.pending > 0
        {
            t.pending -= 1;
            self.in_flight -= 1;
        }
        self.release()
    }

    /// With nothing in flight, everything the server sent so far is delivered, so a
    /// keepalive's position may be confirmed too. This keeps the slot moving while
    /// other tables write WAL, so the primary does not retain it for nothing.
    pub fn idle_advance(&mut self, server_pos: Lsn) -> bool {
        if self.txns.is_empty() && server_pos > self.confirmed {
            self.confirmed = server_pos;
            return true;
        }
        false
    }

    /// Highest LSN that may be sent as the flush position.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Records awaiting a Kafka acknowledgement.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Transactions not yet confirmed (including the one being read).
    pub fn open_transactions(&self) -> usize {
        self.txns.len()
    }

    /// The full sequence number of an open transaction from its low `bits` bits
    /// (delivery tags carry only those). Open transactions span far fewer than
    /// 2^`bits` numbers, so the one at or after the oldest open transaction is meant;
    /// this keeps tags unambiguous however long a session runs.
    pub fn resolve(&self, low: u64, bits: u32) -> TxnSeq {
        let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
        TxnSeq(self.base + (low.wrapping_sub(self.base) & mask))
    }

    /// Caller data of the oldest unconfirmed transaction.
    pub fn oldest(&self) -> Option<&M> {
        self.txns.front().map(|t| &t.meta)
    }

    fn get_mut(&mut self, txn: TxnSeq) -> Option<&mut Txn<M>> {
        let idx = txn.0.checked_sub(self.base)?;
        self.txns.get_mut(usize::try_from(idx).ok()?)
    }

    fn release(&mut self) -> Vec<M> {
        let mut done = Vec::new();
        while let Some(front) = self.txns.front() {
            if !(front.committed && front.pending == 0) {
                break;
            }
            if let Some(t) = self.txns.pop_front() {
                self.base += 1;
                // end LSNs grow with commit order; max() guards against a
                // keepalive having moved `confirmed` past an empty prefix.
                self.confirmed = self.confirmed.max(t.end_lsn);
                done.push(t.meta);
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn(v)
    }

    #[test]
    fn confirms_only_a_fully_acked_prefix() {
        let mut c = Checkpoints::new(lsn(10));
        let t1 = c.begin("t1");
        c.add_record(t1);
        c.add_record(t1);
        assert!(c.commit(t1, lsn(100)).is_empty());
        let t2 = c.begin("t2");
        c.add_record(t2);
        c.commit(t2, lsn(200));

        // t2 acked first: nothing may be confirmed, t1 is still open.
        assert!(c.ack(t2).is_empty());
        assert_eq!(c.confirmed(), lsn(10));
        assert!(c.ack(t1).is_empty());
        assert_eq!(c.confirmed(), lsn(10));
        // last record of t1 releases t1 and t2 together.
        assert_eq!(c.ack(t1), vec!["t1", "t2"]);
        assert_eq!(c.confirmed(), lsn(200));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn an_open_transaction_blocks_even_when_acked() {
        let mut c = Checkpoints::new(lsn(0));
        let t = c.begin(());
        c.add_record(t);
        assert!(c.ack(t).is_empty(), "commit not seen yet: more records may follow");
        assert_eq!(c.commit(t, lsn(50)).len(), 1);
        assert_eq!(c.confirmed(), lsn(50));
    }

    #[test]
    fn transactions_without_outbox_records_confirm_at_commit() {
        let mut c = Checkpoints::new(lsn(0));
        let t = c.begin(());
        assert_eq!(c.commit(t, lsn(70)).len(), 1);
        assert_eq!(c.confirmed(), lsn(70));
    }

    #[test]
    fn idle_advance_only_with_nothing_open() {
        let mut c = Checkpoints::new(lsn(0));
        let t = c.begin(());
        c.add_record(t);
        assert!(!c.idle_advance(lsn(500)));
        c.commit(t, lsn(100));
        c.ack(t);
        assert!(c.idle_advance(lsn(500)));
        assert_eq!(c.confirmed(), lsn(500));
        assert!(!c.idle_advance(lsn(400)), "never moves backwards");
    }

    #[test]
    fn sequence_numbers_resolve_across_the_tag_width() {
        let mut c: Checkpoints<()> = Checkpoints::new(lsn(0));
        // Move the base close to a multiple of 2^8 and open transactions across it.
        for i in 0..250u64 {
            let t = c.begin(());
            c.commit(t, lsn(i + 1));
        }
        let open: Vec<TxnSeq> = (0..10).map(|_| c.begin(())).collect();
        for t in &open {
            assert_eq!(c.resolve(t.as_u64() & 0xff, 8), *t, "seq {}", t.as_u64());
        }
    }

    #[test]
    fn stale_acks_are_ignored() {
        let mut c = Checkpoints::new(lsn(0));
        let t = c.begin(());
        c.add_record(t);
        c.commit(t, lsn(10));
        c.ack(t);
        assert!(c.ack(t).is_empty());
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn randomized_ack_order_never_confirms_an_unacked_record() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut c = Checkpoints::new(lsn(0));
            let mut acks = Vec::new();
            let mut ends = Vec::new();
            for i in 0..20u64 {
                let t = c.begin(i);
                let n = rng.random_range(0..4);
                for _ in 0..n {
                    c.add_record(t);
                    acks.push((t, i));
                }
                c.commit(t, lsn((i + 1) * 100));
                ends.push(((i + 1) * 100, n));
            }
            acks.shuffle(&mut rng);
            let mut acked = [0u32; 20];
            for (t, i) in acks {
                c.ack(t);
                acked[i as usize] += 1;
                // every transaction ending at or below `confirmed` is fully acked
                for (idx, (end, n)) in ends.iter().enumerate() {
                    if *end <= c.confirmed().0 {
                        assert_eq!(acked[idx], *n, "confirmed past an unacked record");
                    }
                }
            }
            assert_eq!(c.confirmed(), lsn(2000));
        }
    }
}
