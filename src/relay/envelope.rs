//! The record's envelope beyond key and payload: its timestamp, a fixed partition,
//! CloudEvents and W3C trace-context headers. Pure: text in, values out.
//!
//! The rule throughout: a bad envelope value never holds an event up. The value is
//! replaced (timestamp: the commit time; partition: the key's hash) or its header is
//! left out (traceparent, tracestate), and the mapping reports a [`Fallback`] the
//! session counts in `outbox_relay_envelope_fallbacks_total{kind}`. The event itself
//! is what consumers are owed; its envelope is best effort.

use bytes::Bytes;

use super::pgoutput::PgTimestamp;

/// Header names of the CloudEvents Kafka protocol binding (binary content mode):
/// attributes carry the `ce_` prefix, except `datacontenttype`, which is `content-type`.
pub mod ce {
    pub const SPECVERSION: &str = "ce_specversion";
    pub const ID: &str = "ce_id";
    pub const SOURCE: &str = "ce_source";
    pub const TYPE: &str = "ce_type";
    pub const TIME: &str = "ce_time";
    pub const CONTENT_TYPE: &str = "content-type";
    /// The CloudEvents version these headers follow.
    pub const SPEC_VERSION: &str = "1.0";
    pub const DEFAULT_CONTENT_TYPE: &str = "application/json";
}

/// W3C trace-context header names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Header names a `headerColumns` entry may not take: the relay writes these itself
/// (or will once an option is turned on), and two headers under one name leave the
/// consumer guessing which one counts. Checked by the API server (this rule) and by
/// the worker ([`reserved_header`]) for spec files.
/// Case-insensitive: consumers that read headers the HTTP way (CloudEvents SDKs among
/// them) would take `Content-Type` for `content-type`.
pub const RESERVED_HEADERS_CEL: &str = "!(self.header.lowerAscii() in ['id', 'type', 'traceparent', 'tracestate', 'content-type']) && !self.header.lowerAscii().startsWith('ce_') && !self.header.lowerAscii().startsWith('outbox-')";
pub const RESERVED_HEADERS_MESSAGE: &str = "header is reserved: the relay itself writes id, type, traceparent, tracestate, content-type, ce_* and outbox-* headers; pick another header name";

/// Why a header name may not be used for a header column, if it may not.
pub fn reserved_header(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    let name = name.as_str();
    match name {
        "id" | "type" => Some("the relay writes the id and type headers"),
        TRACEPARENT | TRACESTATE => Some("trace context comes from spec.outbox.columns.traceparent and tracestate"),
        ce::CONTENT_TYPE => Some("content-type is written by spec.kafka.cloudEvents"),
        _ if name.starts_with("ce_") => Some("ce_* headers are CloudEvents attributes (spec.kafka.cloudEvents)"),
        _ if name.starts_with("outbox-") => Some("outbox-* headers are the relay's dead-letter headers"),
        _ => None,
    }
}

/// Fallback categories (metric label and log field).
pub mod kinds {
    pub const INVALID_TIMESTAMP: &str = "InvalidTimestamp";
    pub const INVALID_PARTITION: &str = "InvalidPartition";
    pub const INVALID_TRACEPARENT: &str = "InvalidTraceparent";
    pub const INVALID_TRACESTATE: &str = "InvalidTracestate";
}

/// An envelope value that was replaced or left out; the event went on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    pub kind: &'static str,
    pub reason: String,
}

/// A row's value as a fallback's reason quotes it: at most 64 characters, so a
/// huge bad value cannot flood the log.
pub fn shown(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    match s.char_indices().nth(64) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// The CloudEvents attributes fixed per relay (resolved from the spec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudEvents {
    pub source: Bytes,
    pub content_type: Bytes,
}

impl CloudEvents {
    /// `source` defaults to `/outbox/<namespace>/<name>`: a URI reference unique per
    /// relay, which is what `source` + `id` being globally unique asks for.
    pub fn new(namespace: &str, name: &str, source: Option<&str>, content_type: Option<&str>) -> Self {
        Self {
            source: Bytes::from(
                source
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("/outbox/{namespace}/{name}")),
            ),
            content_type: Bytes::from(content_type.unwrap_or(ce::DEFAULT_CONTENT_TYPE).to_string()),
        }
    }

    /// The binary-mode headers of one event, in the binding's order.
    pub fn headers(
        &self,
        event_id: Option<&Bytes>,
        event_type: Option<&Bytes>,
        time: PgTimestamp,
        out: &mut Vec<(String, Bytes)>,
    ) {
        out.push((ce::SPECVERSION.into(), Bytes::from_static(ce::SPEC_VERSION.as_bytes())));
        if let Some(id) = event_id {
            out.push((ce::ID.into(), id.clone()));
        }
        out.push((ce::SOURCE.into(), self.source.clone()));
        if let Some(t) = event_type {
            out.push((ce::TYPE.into(), t.clone()));
        }
        // PgTimestamp prints RFC 3339 in UTC with microseconds.
        out.push((ce::TIME.into(), Bytes::from(time.to_string())));
        out.push((ce::CONTENT_TYPE.into(), self.content_type.clone()));
    }
}

/// Kafka record timestamp (milliseconds since 1970) of a timestamp, if Kafka can
/// carry it: librdkafka takes 0 for "now", and brokers refuse negative ones.
pub fn kafka_millis(t: PgTimestamp) -> Option<i64> {
    let ms = t.unix_micros().div_euclid(1000);
    (ms > 0).then_some(ms)
}

/// The record timestamp from the timestamp column's text, or the commit time with
/// the reason it was not used. NULL means "not given", like a NULL partition or
/// traceparent: the commit time, and nothing to count.
pub fn record_time(text: Option<&[u8]>, commit_time: PgTimestamp) -> (PgTimestamp, Option<Fallback>) {
    let Some(text) = text else {
        return (commit_time, None);
    };
    match parse_timestamp(text) {
        Some(t) if kafka_millis(t).is_some() => (t, None),
        _ => (
            commit_time,
            Some(Fallback {
                kind: kinds::INVALID_TIMESTAMP,
                reason: format!(
                    "timestamp {} is not a time after 1970 in years up to 9999; the record has the commit time",
                    shown(text)
                ),
            }),
        ),
    }
}

/// Parses PostgreSQL's ISO output of `timestamptz` (`2024-01-02 03:04:05.123456+01`,
/// offsets `+HH`, `+HH:MM` or `+HH:MM:SS`) and of `timestamp` (no offset: read as UTC).
/// A `T` separator and a `Z` offset are taken too. `infinity`, BC dates and years past
/// 9999 are `None`. The worker's replication connection asks for `DateStyle=ISO` and
/// `TimeZone=UTC`, so this is the only form the stream carries.
pub fn parse_timestamp(text: &[u8]) -> Option<PgTimestamp> {
    let s = std::str::from_utf8(text).ok()?;
    let mut p = Cursor { s: s.as_bytes(), i: 0 };
    let year = p.digits(4, 4)?;
    p.eat(b'-')?;
    let month = p.digits(2, 2)?;
    p.eat(b'-')?;
    let day = p.digits(2, 2)?;
    p.eat(b' ').or_else(|| p.eat(b'T'))?;
    let hour = p.digits(2, 2)?;
    p.eat(b':')?;
    let minute = p.digits(2, 2)?;
    p.eat(b':')?;
    let second = p.digits(2, 2)?;
    let mut micros = 0;
    if p.eat(b'.').is_some() {
        let start = p.i;
        let frac = p.digits(1, 6)?;
        micros = frac * 10i64.pow(6 - (p.i - start) as u32);
    }
    let offset_secs = match p.peek() {
        None => 0,
        Some(b'Z') => {
            p.i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            p.i += 1;
            let h = p.digits(2, 2)?;
            let m = if p.eat(b':').is_some() { p.digits(2, 2)? } else { 0 };
            let sec = if p.eat(b':').is_some() { p.digits(2, 2)? } else { 0 };
            if h > 15 || m > 59 || sec > 59 {
                return None;
            }
            let total = h * 3600 + m * 60 + sec;
            if sign == b'-' { -total } else { total }
        }
        Some(_) => return None,
    };
    if p.peek().is_some()
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(PgTimestamp::from_unix_micros(
        (local - offset_secs) * 1_000_000 + micros,
    ))
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.i += 1)
    }
    /// `min..=max` ASCII digits as a number.
    fn digits(&mut self, min: usize, max: usize) -> Option<i64> {
        let start = self.i;
        while self.i - start < max && self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        if self.i - start < min {
            return None;
        }
        Some(
            self.s[start..self.i]
                .iter()
                .fold(0i64, |n, b| n * 10 + i64::from(b - b'0')),
        )
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`, the inverse of the one `PgTimestamp`'s display uses).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The partition column's text form (`int2`, `int4`, `int8`) as a partition number,
/// or why it cannot be one.
pub fn parse_partition(text: &[u8]) -> Result<i32, Fallback> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .filter(|p| *p >= 0)
        .ok_or_else(|| Fallback {
            kind: kinds::INVALID_PARTITION,
            reason: format!(
                "partition {} is not a partition number; the key's hash picks the partition",
                shown(text)
            ),
        })
}

/// Where a record asking for `requested` goes, given the topic's partition count
/// (`None`: not known, so the broker decides).
pub fn partition_for(requested: Option<i32>, partitions: Option<usize>) -> Result<Option<i32>, Fallback> {
    match (requested, partitions) {
        (Some(p), Some(n)) if usize::try_from(p).is_ok_and(|p| p >= n) => Err(Fallback {
            kind: kinds::INVALID_PARTITION,
            reason: format!("partition {p} does not exist (the topic has {n}); the key's hash picks the partition"),
        }),
        (requested, _) => Ok(requested),
    }
}

/// W3C trace context `traceparent`: `version-traceid-parentid-flags`, lowercase hex,
/// version not `ff`, trace and parent ids not all zero. Version `00` is exactly 55
/// characters; a later version may append fields after a `-` (forward compatible).
pub fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |s: &[u8]| s.iter().all(|b| *b == b'0');
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return false;
    }
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    if !(hex(version) && hex(trace) && hex(parent) && hex(flags)) || version == b"ff" || zeros(trace) || zeros(parent) {
        return false;
    }
    match version {
        b"00" => v.len() == 55,
        _ => v.len() == 55 || v[55] == b'-',
    }
}

/// W3C `tracestate`: at most 512 characters of printable ASCII. Its list members are
/// the vendors' business; this only keeps a header that cannot be one out.
pub fn valid_tracestate(v: &[u8]) -> bool {
    v.len() <= 512 && v.iter().all(|b| (0x20..=0x7e).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Option<String> {
        parse_timestamp(s.as_bytes()).map(|t| t.to_string())
    }

    #[test]
    fn parses_postgres_iso_timestamps_with_any_offset() {
        assert_eq!(
            ts("2024-01-02 03:04:05+00").as_deref(),
            Some("2024-01-02T03:04:05.000000Z")
        );
        assert_eq!(
            ts("2024-01-02 03:04:05.123456+00").as_deref(),
            Some("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            ts("2024-01-02 03:04:05.5+00").as_deref(),
            Some("2024-01-02T03:04:05.500000Z")
        );
        assert_eq!(
            ts("2024-01-02 03:04:05+01").as_deref(),
            Some("2024-01-02T02:04:05.000000Z")
        );
        assert_eq!(
            ts("2024-01-02 00:04:05-05:30").as_deref(),
            Some("2024-01-02T05:34:05.000000Z")
        );
        // Historic local mean time offsets have seconds.
        assert_eq!(
            ts("1900-01-01 00:00:00+00:53:28").as_deref(),
            Some("1899-12-31T23:06:32.000000Z")
        );
        assert_eq!(
            ts("2024-02-29T23:59:59Z").as_deref(),
            Some("2024-02-29T23:59:59.000000Z")
        );
        // `timestamp` without time zone: read as UTC.
        assert_eq!(
            ts("2024-03-01 12:00:00").as_deref(),
            Some("2024-03-01T12:00:00.000000Z")
        );
    }

    #[test]
    fn refuses_what_is_not_a_time() {
        for bad in [
            "",
            "infinity",
            "-infinity",
            "2024-01-02",
            "2024-13-01 00:00:00+00",
            "2023-02-29 00:00:00+00",
            "2024-01-02 24:00:00+00",
            "2024-01-02 03:04:05.1234567+00",
            "2024-01-02 03:04:05+00 BC",
            "10000-01-01 00:00:00+00",
            "2024-01-02 03:04:05 +00",
            "2024-01-02 03:04:05+99",
            "24-01-02 03:04:05+00",
        ] {
            assert_eq!(ts(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn days_from_civil_inverts_the_display() {
        for s in [
            "1970-01-01 00:00:00",
            "2000-02-29 12:00:00",
            "2100-03-01 00:00:00",
            "1601-01-01 00:00:00",
        ] {
            let t = parse_timestamp(s.as_bytes()).expect(s);
            assert_eq!(t.to_string().replace('T', " ")[..19], s[..]);
        }
        assert_eq!(
            parse_timestamp(b"2000-01-01 00:00:00+00"),
            Some(PgTimestamp(0)),
            "PostgreSQL's epoch"
        );
    }

    #[test]
    fn record_time_falls_back_to_the_commit_time() {
        let commit = PgTimestamp(5_000_000);
        let (t, f) = record_time(Some(b"2024-01-02 03:04:05+00"), commit);
        assert_eq!((t.to_string().as_str(), f), ("2024-01-02T03:04:05.000000Z", None));
        assert_eq!(record_time(None, commit), (commit, None), "NULL: not given");
        for text in [
            Some(&b"yesterday"[..]),
            Some(b"1969-12-31 23:59:59+00"),
            Some(b"1970-01-01 00:00:00+00"),
        ] {
            let (t, f) = record_time(text, commit);
            assert_eq!(t, commit, "{text:?}");
            assert_eq!(f.map(|f| f.kind), Some(kinds::INVALID_TIMESTAMP));
        }
        assert_eq!(kafka_millis(PgTimestamp(0)), Some(946_684_800_000));
    }

    #[test]
    fn partition_numbers_and_ranges() {
        assert_eq!(parse_partition(b"3"), Ok(3));
        for bad in [&b"-1"[..], b"x", b"3000000000", b""] {
            assert_eq!(
                parse_partition(bad).map_err(|f| f.kind),
                Err(kinds::INVALID_PARTITION),
                "{bad:?}"
            );
        }
        assert_eq!(partition_for(Some(2), Some(3)), Ok(Some(2)));
        assert_eq!(partition_for(None, Some(3)), Ok(None));
        assert_eq!(
            partition_for(Some(7), None),
            Ok(Some(7)),
            "unknown count: the broker decides"
        );
        let f = partition_for(Some(3), Some(3)).unwrap_err();
        assert!(f.reason.contains("has 3"), "{}", f.reason);
    }

    #[test]
    fn traceparent_format() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good.as_bytes()));
        assert!(valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-abc-01",
        ] {
            assert!(!valid_traceparent(bad.as_bytes()), "{bad:?}");
        }
        assert!(valid_tracestate(b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(!valid_tracestate(&[b'a'; 513]));
        assert!(!valid_tracestate(b"a=1\n"));
    }

    #[test]
    fn cloud_events_headers_follow_the_kafka_binding() {
        let ce = CloudEvents::new("shop", "orders", None, None);
        let mut out = Vec::new();
        let id = Bytes::from("e1");
        let ty = Bytes::from("OrderCreated");
        ce.headers(Some(&id), Some(&ty), PgTimestamp(0), &mut out);
        let text: Vec<(&str, String)> = out
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        assert_eq!(
            text,
            [
                ("ce_specversion", "1.0".to_string()),
                ("ce_id", "e1".into()),
                ("ce_source", "/outbox/shop/orders".into()),
                ("ce_type", "OrderCreated".into()),
                ("ce_time", "2000-01-01T00:00:00.000000Z".into()),
                ("content-type", "application/json".into()),
            ]
        );
        let mine = CloudEvents::new("shop", "orders", Some("urn:shop"), Some("text/plain"));
        let mut out = Vec::new();
        mine.headers(None, None, PgTimestamp(0), &mut out);
        let names: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["ce_specversion", "ce_source", "ce_time", "content-type"]);
        assert_eq!(out[1].1, Bytes::from("urn:shop"));
        assert_eq!(out[3].1, Bytes::from("text/plain"));
    }

    #[test]
    fn quoted_values_are_bounded() {
        assert_eq!(shown(b"abc"), "\"abc\"");
        let long = shown("é".repeat(100).as_bytes());
        assert_eq!(long.chars().count(), 64 + 3, "{long}");
    }

    #[test]
    fn reserved_header_names() {
        for name in [
            "id",
            "type",
            "traceparent",
            "tracestate",
            "content-type",
            "ce_id",
            "outbox-error-kind",
        ] {
            assert!(reserved_header(name).is_some(), "{name}");
        }
        assert!(reserved_header("Content-Type").is_some(), "case-insensitive");
        assert!(reserved_header("CE_ID").is_some(), "case-insensitive");
        assert_eq!(reserved_header("tenant"), None);
        assert_eq!(reserved_header("cex"), None);
    }
}
