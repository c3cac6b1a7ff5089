//! Decoder for the `pgoutput` logical replication protocol, version 1.
//!
//! Input is the data part of one XLogData message; output is one typed
//! message. The decoder is pure (no I/O, no state between messages) so it can
//! be tested byte for byte, and it never panics: the bytes come from the
//! network, and a relay that crashes on a surprising message would stall the
//! slot and make WAL pile up on the database server.
//!
//! Column values are `Bytes` slices of the input, so decoding a row costs one
//! small `Vec` and no copies of the values themselves. Names (relations,
//! columns, types, origins) become `String`s: they arrive once per relation
//! per session, not once per row.
//!
//! Every message must be consumed exactly. Leftover bytes mean we are reading
//! a protocol version we did not ask for (for example the transaction id that
//! version 2 puts in front of streamed changes), and guessing there would
//! publish wrong data.
//!
//! Reference: "Logical Replication Message Formats" in the PostgreSQL
//! documentation.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::lsn::Lsn;

/// A PostgreSQL timestamp as sent on the wire: microseconds since
/// 2000-01-01 00:00:00 UTC.
///
/// Kept as the raw count so that decoding costs nothing; convert at the edge
/// where a wall-clock time is needed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(pub i64);

/// Seconds from the Unix epoch to PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
const PG_EPOCH_UNIX_MICROS: i64 = PG_EPOCH_UNIX_SECS * 1_000_000;

impl PgTimestamp {
    pub const fn from_micros(micros_since_2000: i64) -> Self {
        PgTimestamp(micros_since_2000)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Microseconds since 1970-01-01 UTC (saturating at the ends of `i64`).
    pub const fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_MICROS)
    }

    pub fn from_unix_micros(micros: i64) -> Self {
        PgTimestamp(micros.saturating_sub(PG_EPOCH_UNIX_MICROS))
    }

    /// Sub-microsecond precision is dropped; times beyond the `i64` range
    /// saturate (they cannot come from a real clock).
    pub fn from_system_time(t: SystemTime) -> Self {
        let unix_micros = match t.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_micros())
                .map(|m| -m)
                .unwrap_or(i64::MIN),
        };
        Self::from_unix_micros(unix_micros)
    }

    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    /// `None` only if the platform's `SystemTime` cannot represent the value.
    pub fn to_system_time(self) -> Option<SystemTime> {
        let unix = self.unix_micros();
        if unix >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_micros(unix.unsigned_abs()))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_micros(unix.unsigned_abs()))
        }
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2024-01-02T03:04:05.000006Z`.
/// Values outside years 0..=9999 (PostgreSQL's `infinity` encodings) print as
/// the raw count instead.
impl fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.unix_micros();
        let secs = micros.div_euclid(1_000_000);
        let sub = micros.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        if !(0..=9999).contains(&y) {
            return write!(f, "{}us since 2000-01-01", self.0);
        }
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{sub:06}Z",
            tod / 3600,
            tod / 60 % 60,
            tod % 60
        )
    }
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`), so logging a time needs no date library.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl fmt::Debug for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgTimestamp({self})")
    }
}

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgOutputError {
    #[error("truncated pgoutput {message} message: {field} at offset {offset} needs {needed} bytes, {remaining} left")]
    Truncated {
        message: &'static str,
        field: &'static str,
        offset: usize,
        needed: usize,
        remaining: usize,
    },
    #[error("unknown pgoutput message type {tag:#04x} ({})", printable(*tag))]
    UnknownMessageType { tag: u8 },
    #[error("malformed pgoutput {message} message at offset {offset}: {reason}")]
    Malformed {
        message: &'static str,
        offset: usize,
        reason: String,
    },
    #[error("pgoutput {message} message: {field} is not valid UTF-8")]
    InvalidUtf8 { message: &'static str, field: &'static str },
}

impl PgOutputError {
    /// Stable name for metrics and status conditions.
    pub fn category(&self) -> &'static str {
        match self {
            PgOutputError::Truncated { .. } => "Truncated",
            PgOutputError::UnknownMessageType { .. } => "UnknownMessageType",
            PgOutputError::Malformed { .. } => "Malformed",
            PgOutputError::InvalidUtf8 { .. } => "InvalidUtf8",
        }
    }
}

fn printable(b: u8) -> char {
    if b.is_ascii_graphic() { b as char } else { '?' }
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

impl PgOutputMessage {
    /// Short name, for logs and error context.
    pub fn kind(&self) -> &'static str {
        match self {
            PgOutputMessage::Begin(_) => "Begin",
            PgOutputMessage::Commit(_) => "Commit",
            PgOutputMessage::Origin(_) => "Origin",
            PgOutputMessage::Relation(_) => "Relation",
            PgOutputMessage::Type(_) => "Type",
            PgOutputMessage::Insert(_) => "Insert",
            PgOutputMessage::Update(_) => "Update",
            PgOutputMessage::Delete(_) => "Delete",
            PgOutputMessage::Truncate(_) => "Truncate",
            PgOutputMessage::Message(_) => "Message",
        }
    }
}

/// Start of a transaction. Changes until the matching [`Commit`] belong to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record: the position a consumer confirms once the
    /// whole transaction is safely delivered.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the first position not covered by this
    /// transaction.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// The transaction was replayed from another node (replication origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// Describes a table. Sent before the first change of that table in a
/// session and again after its definition changes; changes refer to it by
/// `id` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// Schema name; an empty string means `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// Primary key columns (`d`).
    Default,
    /// No old values at all (`n`).
    Nothing,
    /// All columns (`f`).
    Full,
    /// The columns of a chosen unique index (`i`).
    Index,
}

impl ReplicaIdentity {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`; -1 when the type has none.
    pub type_modifier: i32,
}

impl RelationColumn {
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Describes a non-built-in data type used by a following Relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub id: u32,
    /// Schema name; an empty string means `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_id: u32,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_id: u32,
    /// Present only when the replica identity requires it: the key when a key
    /// column changed, the whole old row under `REPLICA IDENTITY FULL`.
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: OldTuple,
}

/// The "before" image of a row in an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity columns have values (`K`); the rest are null.
    Key(TupleData),
    /// The complete old row (`O`).
    Full(TupleData),
}

impl OldTuple {
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
    pub options: u8,
    pub relation_ids: Vec<u32>,
}

impl Truncate {
    pub fn cascade(&self) -> bool {
        self.options & 1 != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & 2 != 0
    }
}

/// A message written with `pg_logical_emit_message` (sent only when the
/// `messages` option is on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Bit 1: transactional (delivered inside its transaction, only if it
    /// commits).
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

impl LogicalMessage {
    pub fn transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// The column values of one row, in the Relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    pub columns: Vec<ColumnValue>,
}

impl TupleData {
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&ColumnValue> {
        self.columns.get(index)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    /// `n`
    Null,
    /// `u`: a TOASTed value that did not change; the actual value is not sent.
    UnchangedToast,
    /// `t`: the type's text output.
    Text(Bytes),
    /// `b`: the type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

impl ColumnValue {
    pub fn is_null(&self) -> bool {
        matches!(self, ColumnValue::Null)
    }

    /// The raw value of a `Text` or `Binary` column.
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            ColumnValue::Text(b) | ColumnValue::Binary(b) => Some(b),
            ColumnValue::Null | ColumnValue::UnchangedToast => None,
        }
    }

    /// The value of a `Text` column as a string; `None` for other kinds or if
    /// it is not UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ColumnValue::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// Decodes one pgoutput (protocol version 1) message.
pub fn decode(data: &Bytes) -> Result<PgOutputMessage, PgOutputError> {
    let Some(&tag) = data.first() else {
        return Err(PgOutputError::Truncated {
            message: "(empty)",
            field: "message type",
            offset: 0,
            needed: 1,
            remaining: 0,
        });
    };
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        _ => return Err(PgOutputError::UnknownMessageType { tag }),
    };
    let mut r = Reader { data, pos: 1, message };
    let decoded = match tag {
        b'B' => PgOutputMessage::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_time: r.timestamp("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => PgOutputMessage::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: r.timestamp("commit timestamp")?,
        }),
        b'O' => PgOutputMessage::Origin(Origin {
            commit_lsn: r.lsn("origin commit LSN")?,
            name: r.cstr("origin name")?,
        }),
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let at = r.pos;
            let identity = r.u8("replica identity")?;
            let replica_identity = ReplicaIdentity::from_byte(identity)
                .ok_or_else(|| r.malformed(at, format!("unknown replica identity {identity:#04x}")))?;
            let count = r.count16("column count")?;
            // Each column takes at least 10 bytes; bounding the allocation by
            // what is left keeps a lying count from reserving memory.
            let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
            for _ in 0..count {
                columns.push(RelationColumn {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type oid")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            PgOutputMessage::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => PgOutputMessage::Type(TypeInfo {
            id: r.u32("type oid")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let relation_id = r.u32("relation id")?;
            r.expect_marker(b'N', "new tuple marker")?;
            PgOutputMessage::Insert(Insert {
                relation_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                b'N' => None,
                other => {
                    return Err(r.malformed(at, format!("expected tuple marker K, O or N, found {other:#04x}")));
                }
            };
            if old.is_some() {
                r.expect_marker(b'N', "new tuple marker")?;
            }
            PgOutputMessage::Update(Update {
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => {
                    return Err(r.malformed(at, format!("expected tuple marker K or O, found {other:#04x}")));
                }
            };
            PgOutputMessage::Delete(Delete { relation_id, old })
        }
        b'T' => {
            let at = r.pos;
            let count = r.i32("relation count")?;
            let count =
                usize::try_from(count).map_err(|_| r.malformed(at, format!("negative relation count {count}")))?;
            let options = r.u8("options")?;
            let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relation_ids.push(r.u32("relation id")?);
            }
            PgOutputMessage::Truncate(Truncate { options, relation_ids })
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.lsn("message LSN")?;
            let prefix = r.cstr("prefix")?;
            let len = r.len32("content length")?;
            let content = r.bytes(len, "content")?;
            PgOutputMessage::Message(LogicalMessage {
                flags,
                lsn,
                prefix,
                content,
            })
        }
        // Every tag accepted above is handled here; reaching this would be a
        // bug in this function, reported as an error rather than a panic.
        _ => return Err(PgOutputError::UnknownMessageType { tag }),
    };
    r.finish()?;
    Ok(decoded)
}

/// Bounds-checked big-endian reads over one message.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], PgOutputError> {
        let data: &'a [u8] = self.data;
        match self.pos.checked_add(n).and_then(|end| data.get(self.pos..end)) {
            Some(slice) => {
                self.pos += n;
                Ok(slice)
            }
            None => Err(PgOutputError::Truncated {
                message: self.message,
                field,
                offset: self.pos,
                needed: n,
                remaining: self.remaining(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], PgOutputError> {
        let slice = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, PgOutputError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, PgOutputError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, PgOutputError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, PgOutputError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, PgOutputError> {
        Ok(Lsn(u64::from_be_bytes(self.array(field)?)))
    }

    fn timestamp(&mut self, field: &'static str) -> Result<PgTimestamp, PgOutputError> {
        Ok(PgTimestamp(i64::from_be_bytes(self.array(field)?)))
    }

    fn count16(&mut self, field: &'static str) -> Result<usize, PgOutputError> {
        let at = self.pos;
        let n = self.i16(field)?;
        usize::try_from(n).map_err(|_| self.malformed(at, format!("negative {field} {n}")))
    }

    fn len32(&mut self, field: &'static str) -> Result<usize, PgOutputError> {
        let at = self.pos;
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| self.malformed(at, format!("negative {field} {n}")))
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, PgOutputError> {
        let start = self.pos;
        self.take(n, field)?;
        Ok(self.data.slice(start..start + n))
    }

    fn cstr(&mut self, field: &'static str) -> Result<String, PgOutputError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(PgOutputError::Truncated {
                message: self.message,
                field,
                offset: self.pos,
                needed: rest.len() + 1,
                remaining: rest.len(),
            });
        };
        let s = std::str::from_utf8(&rest[..len]).map_err(|_| PgOutputError::InvalidUtf8 {
            message: self.message,
            field,
        })?;
        self.pos += len + 1;
        Ok(s.to_owned())
    }

    fn expect_marker(&mut self, want: u8, field: &'static str) -> Result<(), PgOutputError> {
        let at = self.pos;
        let got = self.u8(field)?;
        if got == want {
            Ok(())
        } else {
            Err(self.malformed(at, format!("expected {field} {:?}, found {got:#04x}", printable(want))))
        }
    }

    fn tuple(&mut self) -> Result<TupleData, PgOutputError> {
        let count = self.count16("column count")?;
        // A column takes at least one byte, so this never over-reserves for
        // a count the message cannot back.
        let mut columns = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let at = self.pos;
            let value = match self.u8("column kind")? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => {
                    let len = self.len32("column length")?;
                    ColumnValue::Text(self.bytes(len, "column value")?)
                }
                b'b' => {
                    let len = self.len32("column length")?;
                    ColumnValue::Binary(self.bytes(len, "column value")?)
                }
                other => {
                    return Err(self.malformed(at, format!("unknown column kind {other:#04x}")));
                }
            };
            columns.push(value);
        }
        Ok(TupleData { columns })
    }

    fn malformed(&self, offset: usize, reason: String) -> PgOutputError {
        PgOutputError::Malformed {
            message: self.message,
            offset,
            reason,
        }
    }

    fn finish(&self) -> Result<(), PgOutputError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(self.malformed(
                self.pos,
                format!("{extra} unexpected trailing bytes (different protocol version?)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn hex(s: &str) -> Bytes {
        assert!(s.len().is_multiple_of(2), "odd hex length");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
            .into()
    }

    /// Builds messages by hand, the way pgoutput writes them.
    #[derive(Default)]
    struct Msg(Vec<u8>);

    impl Msg {
        fn new(tag: u8) -> Self {
            Msg(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, s: &str) -> Self {
            let mut m = self.u8(b't').i32(s.len() as i32);
            m.0.extend_from_slice(s.as_bytes());
            m
        }
        fn done(self) -> Bytes {
            self.0.into()
        }
    }

    #[test]
    fn begin_and_commit() {
        let begin = Msg::new(b'B').u64(0x1_0000_00A0).u64(1234).u32(77).done();
        assert_eq!(
            decode(&begin),
            Ok(PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(0x1_0000_00A0),
                commit_time: PgTimestamp(1234),
                xid: 77,
            }))
        );
        let commit = Msg::new(b'C').u8(0).u64(0xA0).u64(0xD8).u64(1234).done();
        assert_eq!(
            decode(&commit),
            Ok(PgOutputMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0xA0),
                end_lsn: Lsn(0xD8),
                commit_time: PgTimestamp(1234),
            }))
        );
    }

    #[test]
    fn relation_with_columns() {
        let m = Msg::new(b'R')
            .u32(16385)
            .cstr("public")
            .cstr("outbox")
            .u8(b'f')
            .i16(2)
            .u8(1)
            .cstr("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .cstr("code")
            .u32(1043)
            .i32(36)
            .done();
        let PgOutputMessage::Relation(rel) = decode(&m).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.id, 16385);
        assert_eq!(rel.namespace, "public");
        assert_eq!(rel.name, "outbox");
        assert_eq!(rel.replica_identity, ReplicaIdentity::Full);
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].is_key());
        assert!(!rel.columns[1].is_key());
        assert_eq!(rel.columns[1].name, "code");
        assert_eq!(rel.columns[1].type_oid, 1043);
        assert_eq!(rel.columns[1].type_modifier, 36);
    }

    #[test]
    fn insert_with_every_column_kind() {
        let m = Msg::new(b'I')
            .u32(5)
            .u8(b'N')
            .i16(4)
            .u8(b'n')
            .u8(b'u')
            .text("héllo")
            .u8(b'b')
            .i32(2)
            .u8(0xFF)
            .u8(0x00)
            .done();
        let PgOutputMessage::Insert(ins) = decode(&m).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(ins.relation_id, 5);
        let cols = &ins.new.columns;
        assert_eq!(cols[0], ColumnValue::Null);
        assert_eq!(cols[1], ColumnValue::UnchangedToast);
        assert_eq!(cols[2].as_str(), Some("héllo"));
        assert_eq!(cols[3], ColumnValue::Binary(Bytes::from_static(&[0xFF, 0])));
        assert_eq!(cols[3].as_str(), None);
    }

    #[test]
    fn values_share_the_input_buffer() {
        let m = Msg::new(b'I').u32(5).u8(b'N').i16(1).text("payload").done();
        let PgOutputMessage::Insert(ins) = decode(&m).unwrap() else {
            panic!("not an insert")
        };
        let value = ins.new.columns[0].bytes().unwrap();
        let range = m.as_ptr_range();
        assert!(range.contains(&value.as_ptr()), "value was copied");
    }

    #[test]
    fn update_variants() {
        let plain = Msg::new(b'U').u32(1).u8(b'N').i16(1).text("a").done();
        let PgOutputMessage::Update(u) = decode(&plain).unwrap() else {
            panic!()
        };
        assert_eq!(u.old, None);
        assert_eq!(u.new.columns[0].as_str(), Some("a"));

        let key = Msg::new(b'U')
            .u32(1)
            .u8(b'K')
            .i16(1)
            .text("k")
            .u8(b'N')
            .i16(1)
            .text("b")
            .done();
        let PgOutputMessage::Update(u) = decode(&key).unwrap() else {
            panic!()
        };
        assert!(matches!(&u.old, Some(OldTuple::Key(t)) if t.columns[0].as_str() == Some("k")));

        let full = Msg::new(b'U')
            .u32(1)
            .u8(b'O')
            .i16(1)
            .text("o")
            .u8(b'N')
            .i16(1)
            .text("b")
            .done();
        let PgOutputMessage::Update(u) = decode(&full).unwrap() else {
            panic!()
        };
        assert!(matches!(&u.old, Some(OldTuple::Full(t)) if t.columns[0].as_str() == Some("o")));

        let bad = Msg::new(b'U').u32(1).u8(b'X').i16(0).done();
        assert_eq!(decode(&bad).unwrap_err().category(), "Malformed");
        let no_new = Msg::new(b'U').u32(1).u8(b'K').i16(0).u8(b'K').i16(0).done();
        assert_eq!(decode(&no_new).unwrap_err().category(), "Malformed");
    }

    #[test]
    fn delete_truncate_type_origin_message() {
        let d = Msg::new(b'D').u32(9).u8(b'K').i16(1).text("1").done();
        assert!(matches!(
            decode(&d),
            Ok(PgOutputMessage::Delete(Delete {
                relation_id: 9,
                old: OldTuple::Key(_)
            }))
        ));
        let d_new = Msg::new(b'D').u32(9).u8(b'N').i16(0).done();
        assert_eq!(decode(&d_new).unwrap_err().category(), "Malformed");

        let t = Msg::new(b'T').i32(2).u8(3).u32(10).u32(11).done();
        let PgOutputMessage::Truncate(t) = decode(&t).unwrap() else {
            panic!()
        };
        assert_eq!(t.relation_ids, vec![10, 11]);
        assert!(t.cascade() && t.restart_identity());
        let negative = Msg::new(b'T').i32(-1).u8(0).done();
        assert_eq!(decode(&negative).unwrap_err().category(), "Malformed");

        let y = Msg::new(b'Y').u32(16400).cstr("public").cstr("mood").done();
        assert_eq!(
            decode(&y),
            Ok(PgOutputMessage::Type(TypeInfo {
                id: 16400,
                namespace: "public".into(),
                name: "mood".into()
            }))
        );

        let o = Msg::new(b'O').u64(0xABCDEF).cstr("upstream").done();
        assert_eq!(
            decode(&o),
            Ok(PgOutputMessage::Origin(Origin {
                commit_lsn: Lsn(0xABCDEF),
                name: "upstream".into()
            }))
        );

        let mut m = Msg::new(b'M').u8(1).u64(0x42).cstr("outbox").i32(3);
        m.0.extend_from_slice(b"abc");
        let PgOutputMessage::Message(m) = decode(&m.done()).unwrap() else {
            panic!()
        };
        assert!(m.transactional());
        assert_eq!(m.lsn, Lsn(0x42));
        assert_eq!(m.prefix, "outbox");
        assert_eq!(&m.content[..], b"abc");
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(decode(&Bytes::new()).unwrap_err().category(), "Truncated");
        // Version 2 streaming messages are not part of what we negotiate.
        let err = decode(&Bytes::from_static(b"S\0\0\0\x01\x01")).unwrap_err();
        assert_eq!(err, PgOutputError::UnknownMessageType { tag: b'S' });
        assert!(err.to_string().contains("(S)"), "{err}");
        let trailing = Msg::new(b'B').u64(1).u64(2).u32(3).u8(0).done();
        assert_eq!(decode(&trailing).unwrap_err().category(), "Malformed");
        let bad_utf8 = Msg::new(b'Y').u32(1).u8(0xFF).u8(0).cstr("x").done();
        assert_eq!(decode(&bad_utf8).unwrap_err().category(), "InvalidUtf8");
        let bad_kind = Msg::new(b'I').u32(1).u8(b'N').i16(1).u8(b'x').done();
        assert_eq!(decode(&bad_kind).unwrap_err().category(), "Malformed");
        let huge_len = Msg::new(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(i32::MAX).done();
        assert_eq!(decode(&huge_len).unwrap_err().category(), "Truncated");
        let negative_len = Msg::new(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-1).done();
        assert_eq!(decode(&negative_len).unwrap_err().category(), "Malformed");
        let bad_identity = Msg::new(b'R').u32(1).cstr("").cstr("t").u8(b'z').i16(0).done();
        assert_eq!(decode(&bad_identity).unwrap_err().category(), "Malformed");
    }

    #[test]
    fn timestamps_use_the_2000_epoch() {
        assert_eq!(PgTimestamp(0).unix_micros(), 946_684_800_000_000);
        assert_eq!(PgTimestamp(0).to_string(), "2000-01-01T00:00:00.000000Z");
        let t = PgTimestamp::from_system_time(UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456));
        assert_eq!(t.unix_micros(), 1_700_000_000_123_456);
        assert_eq!(
            t.to_system_time(),
            Some(UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456))
        );
        let before_1970 = PgTimestamp::from_unix_micros(-5);
        assert_eq!(
            before_1970.to_system_time(),
            UNIX_EPOCH.checked_sub(Duration::from_micros(5))
        );
        assert!(PgTimestamp::now() > PgTimestamp(0));
        assert!(PgTimestamp(i64::MAX).to_string().contains("since 2000"));
        assert!(PgTimestamp(i64::MIN).to_string().contains("since 2000"));
        assert_eq!(
            PgTimestamp::from_unix_micros(1_700_000_000_123_456).to_string(),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(PgTimestamp(-1).to_string(), "1999-12-31T23:59:59.999999Z");
        assert_eq!(
            PgTimestamp::from_unix_micros(951_782_400_000_000).to_string(),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    /// Messages captured from a real PostgreSQL 15; see the fixture's header.
    fn fixtures() -> Vec<(Lsn, u32, Bytes)> {
        include_str!("../../tests/fixtures/pgoutput_v1.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split_whitespace();
                let lsn = parts.next().unwrap().parse().unwrap();
                let xid = parts.next().unwrap().parse().unwrap();
                (lsn, xid, hex(parts.next().unwrap()))
            })
            .collect()
    }

    #[test]
    fn decodes_every_captured_message() {
        let fx = fixtures();
        assert!(fx.len() > 40);
        let mut kinds = std::collections::BTreeSet::new();
        for (lsn, xid, data) in &fx {
            let msg = decode(data).unwrap_or_else(|e| panic!("{lsn} {xid}: {e}"));
            kinds.insert(msg.kind());
        }
        let all = [
            "Begin", "Commit", "Origin", "Relation", "Type", "Insert", "Update", "Delete", "Truncate", "Message",
        ];
        assert_eq!(kinds.into_iter().collect::<Vec<_>>().len(), all.len());
    }

    #[test]
    fn captured_transaction_has_expected_values() {
        let fx = fixtures();
        let msgs: Vec<PgOutputMessage> = fx.iter().map(|(_, _, d)| decode(d).unwrap()).collect();

        // First transaction: Begin, Type(mood), Relation(outbox), 2 inserts, Commit.
        let PgOutputMessage::Begin(begin) = &msgs[0] else {
            panic!("{:?}", msgs[0])
        };
        assert_eq!(begin.xid, fx[0].1);
        let PgOutputMessage::Type(ty) = &msgs[1] else { panic!() };
        assert_eq!((ty.namespace.as_str(), ty.name.as_str()), ("public", "mood"));
        let PgOutputMessage::Relation(rel) = &msgs[2] else {
            panic!()
        };
        assert_eq!(rel.name, "outbox");
        assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
        let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "aggregate",
                "payload",
                "headers",
                "created_at",
                "note",
                "feeling",
                "big"
            ]
        );
        assert!(rel.columns[0].is_key());
        assert_eq!(rel.columns[0].type_oid, 20); // int8
        assert_eq!(rel.columns[2].type_oid, 3802); // jsonb
        assert_eq!(rel.columns[6].type_oid, ty.id);

        let PgOutputMessage::Insert(first) = &msgs[3] else {
            panic!()
        };
        assert_eq!(first.relation_id, rel.id);
        let c = &first.new.columns;
        assert_eq!(c[0].as_str(), Some("1"));
        assert_eq!(c[1].as_str(), Some("order"));
        assert_eq!(c[2].as_str(), Some(r#"{"a": 1}"#));
        assert_eq!(c[3].as_str(), Some(r"\x00ff0a"));
        assert_eq!(c[4].as_str(), Some("2024-01-02 03:04:05+00"));
        assert!(c[5].is_null());
        assert_eq!(c[6].as_str(), Some("happy"));
        assert!(c[7].is_null());

        let PgOutputMessage::Insert(second) = &msgs[4] else {
            panic!()
        };
        assert_eq!(second.new.columns[1].as_str(), Some("ordér ✓"));
        assert_eq!(second.new.columns[5].as_str(), Some("it's"));

        let PgOutputMessage::Commit(commit) = &msgs[5] else {
            panic!()
        };
        assert_eq!(commit.commit_lsn, begin.final_lsn);
        assert_eq!(commit.commit_time, begin.commit_time);
        assert!(commit.end_lsn > commit.commit_lsn);

        // The rolled-back transaction left nothing: the next Begin is the
        // TOASTed insert.
        let PgOutputMessage::Begin(_) = &msgs[6] else { panic!() };
        let PgOutputMessage::Insert(toasted) = &msgs[7] else {
            panic!()
        };
        assert_eq!(toasted.new.columns[1].as_str(), Some("toast"));
        assert_eq!(toasted.new.columns[7].bytes().map(|b| b.len()), Some(64_000));

        // Updating another column leaves the TOASTed one out.
        let PgOutputMessage::Update(u) = &msgs[10] else {
            panic!()
        };
        assert_eq!(u.old, None);
        assert_eq!(u.new.columns[5].as_str(), Some("n2"));
        assert_eq!(u.new.columns[7], ColumnValue::UnchangedToast);

        // Changing the key sends the old key.
        let PgOutputMessage::Update(u) = &msgs[13] else {
            panic!()
        };
        let Some(OldTuple::Key(k)) = &u.old else {
            panic!("{u:?}")
        };
        assert_eq!(k.columns[0].as_str(), Some("3"));
        assert!(k.columns[1..].iter().all(ColumnValue::is_null));
        assert_eq!(u.new.columns[0].as_str(), Some("4"));
    }

    #[test]
    fn captured_full_identity_truncate_messages_and_origin() {
        let msgs: Vec<PgOutputMessage> = fixtures().iter().map(|(_, _, d)| decode(d).unwrap()).collect();
        let full_update = msgs.iter().find_map(|m| match m {
            PgOutputMessage::Update(
                u @ Update {
                    old: Some(OldTuple::Full(_)),
                    ..
                },
            ) => Some(u),
            _ => None,
        });
        let u = full_update.expect("an update with the full old row");
        assert_eq!(u.old.as_ref().unwrap().tuple().columns[1].as_str(), Some("x"));
        assert_eq!(u.new.columns[1].as_str(), Some("y"));
        assert!(msgs.iter().any(|m| matches!(
            m,
            PgOutputMessage::Delete(Delete {
                old: OldTuple::Full(_),
                ..
            })
        )));

        let t = msgs
            .iter()
            .find_map(|m| match m {
                PgOutputMessage::Truncate(t) => Some(t),
                _ => None,
            })
            .unwrap();
        assert_eq!(t.relation_ids.len(), 2);
        assert!(t.cascade() && t.restart_identity());

        let logical: Vec<&LogicalMessage> = msgs
            .iter()
            .filter_map(|m| match m {
                PgOutputMessage::Message(m) => Some(m),
                _ => None,
            })
            .collect();
        assert_eq!(logical.len(), 2);
        assert!(logical[0].transactional());
        assert_eq!(&logical[0].content[..], b"hello");
        assert!(!logical[1].transactional());
        assert_eq!(&logical[1].content[..], &[0, 1]);
        assert_eq!(logical[1].prefix, "outbox");

        let origin = msgs
            .iter()
            .find_map(|m| match m {
                PgOutputMessage::Origin(o) => Some(o),
                _ => None,
            })
            .unwrap();
        assert_eq!(origin.name, "upstream");
        assert_eq!(origin.commit_lsn, "0/ABCDEF".parse().unwrap());
    }

    #[test]
    fn every_strict_prefix_of_a_real_message_is_an_error() {
        for (lsn, _, data) in fixtures() {
            for cut in 0..data.len() {
                let prefix = data.slice(..cut);
                assert!(decode(&prefix).is_err(), "{lsn}: prefix of {cut} bytes decoded");
            }
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let tags = b"BCORYIUDTMSEcAbPKrpz\0";
        let fx = fixtures();
        for i in 0..50_000 {
            let data: Bytes = if i % 2 == 0 {
                // Random bytes behind a plausible tag, biased towards the
                // small counts and lengths that reach the deeper branches.
                let len = rng.random_range(0..64);
                let mut v = vec![tags[rng.random_range(0..tags.len())]];
                v.extend((0..len).map(|_| {
                    if rng.random_bool(0.5) {
                        rng.random_range(0..4)
                    } else {
                        rng.random()
                    }
                }));
                v.into()
            } else {
                // A real message with a few bytes changed.
                let (_, _, base) = &fx[rng.random_range(0..fx.len())];
                let mut v = base.to_vec();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..v.len());
                    v[at] = rng.random();
                }
                if rng.random_bool(0.3) {
                    v.truncate(rng.random_range(0..v.len()));
                }
                v.into()
            };
            let _ = decode(&data);
        }
    }
}
