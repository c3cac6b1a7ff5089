//! Delivery tags: what a Kafka record carries back in its delivery report.
//!
//! librdkafka hands each record's opaque integer back with its delivery report.
//! Packing everything the delivery core needs into that integer keeps the
//! per-event path free of a lookup table and of an allocation per record:
//! `| transaction sequence, low 36 bits | record size: 27 bits | dead-letter: 1 bit |`.
//! The size lets the core bound the bytes in flight (sizes clamp at 128 MiB, above
//! the largest record allowed); the sequence is completed from the open
//! transactions by [`super::checkpoint::Checkpoints::resolve`].

use super::checkpoint::TxnSeq;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub txn: TxnSeq,
    pub size: u64,
    pub dead_letter: bool,
}

const SIZE_BITS: u32 = 27;
/// Largest size a tag carries; larger sizes clamp to it.
pub const SIZE_MAX: u64 = (1 << SIZE_BITS) - 1;
/// Bits of the transaction sequence a tag carries.
pub const SEQ_BITS: u32 = 64 - SIZE_BITS - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

impl Tag {
    pub fn new(txn: TxnSeq, size: usize, dead_letter: bool) -> Self {
        Self {
            txn,
            size: (size as u64).min(SIZE_MAX),
            dead_letter,
        }
    }

    pub fn encode(self) -> usize {
        (((self.txn.as_u64() & SEQ_MASK) << (SIZE_BITS + 1)) | (self.size << 1) | u64::from(self.dead_letter)) as usize
    }

    /// The transaction sequence comes back truncated to [`SEQ_BITS`]; the core
    /// completes it.
    pub fn decode(tag: usize) -> Self {
        let v = tag as u64;
        Self {
            txn: TxnSeq::from_u64(v >> (SIZE_BITS + 1)),
            size: (v >> 1) & SIZE_MAX,
            dead_letter: v & 1 == 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for (seq, size, dlq) in [
            (0, 0, false),
            (12345, 1024, true),
            ((1 << 36) - 1, SIZE_MAX as usize, true),
        ] {
            let t = Tag::new(TxnSeq::from_u64(seq), size, dlq);
            assert_eq!(Tag::decode(t.encode()), t);
        }
        let big = Tag::new(TxnSeq::from_u64(7), usize::MAX, false);
        assert_eq!(
            Tag::decode(big.encode()).size,
            SIZE_MAX,
            "sizes clamp instead of spilling into the sequence"
        );
        assert_eq!(Tag::decode(big.encode()).txn, TxnSeq::from_u64(7));
        let wrapped = Tag::new(TxnSeq::from_u64(SEQ_MASK + 5), 1, false);
        assert_eq!(
            Tag::decode(wrapped.encode()).txn,
            TxnSeq::from_u64(4),
            "only the low bits travel"
        );
    }
}
