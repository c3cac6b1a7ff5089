//! Write-ahead-log positions.
//!
//! An LSN is a byte offset into PostgreSQL's WAL. Everything the relay promises
//! (what it has published, what it tells the server it may discard) is stated
//! as an LSN, so it gets a type of its own instead of a bare `u64` that could be
//! confused with an offset, a count or a timestamp.

use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};

/// A WAL position, shown and parsed the way PostgreSQL does: `16/B374D848`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: PostgreSQL's "invalid" position. A slot or a status update that
    /// reports it means "nothing yet", never "everything up to the start".
    pub const ZERO: Lsn = Lsn(0);

    pub const fn new(value: u64) -> Self {
        Lsn(value)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Bytes of WAL from `earlier` to `self`, 0 when `earlier` is ahead.
    /// Used for lag figures, where a negative distance only means "caught up".
    pub const fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal numbers of 1 to 8 digits separated by '/'")]
pub struct LsnParseError {
    input: String,
}

impl LsnParseError {
    pub fn category(&self) -> &'static str {
        "InvalidLsn"
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    /// Accepts what `pg_lsn`'s input function accepts: `X/X`, each half 1–8 hex
    /// digits in either case, no surrounding blanks.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError {
            input: s.chars().take(64).collect(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| -> Result<u64, LsnParseError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

// Debug shows the PostgreSQL form too, so logs and assertion failures can be
// compared directly with what `pg_replication_slots` shows.
impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(value: Lsn) -> Self {
        value.0
    }
}

// As a string, because that is how operators read and type LSNs (status fields,
// logs) and because a JSON number cannot hold every u64 exactly.
impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Lsn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an LSN such as \"16/B374D848\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Lsn, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

// So queries can bind and read `pg_lsn` values directly, e.g.
// `SELECT confirmed_flush_lsn FROM pg_replication_slots`.
impl<'a> FromSql<'a> for Lsn {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Lsn(postgres_protocol::types::lsn_from_sql(raw)?))
    }

    accepts!(PG_LSN);
}

impl ToSql for Lsn {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        postgres_protocol::types::lsn_to_sql(self.0, out);
        Ok(IsNull::No)
    }

    accepts!(PG_LSN);
    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_form() {
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::ZERO));
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("16/b374d848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>(), Ok(Lsn(u64::MAX)));
        assert_eq!("0/0001".parse::<Lsn>(), Ok(Lsn(1)));
    }

    #[test]
    fn rejects_what_postgres_rejects() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            " 0/0",
            "0/0 ",
            "+1/0",
            "-1/0",
            "123456789/0",
            "0/123456789",
            "g/0",
            "0x1/0",
            "1/ 2",
            "ü/0",
        ] {
            let err = bad.parse::<Lsn>().expect_err(bad);
            assert_eq!(err.category(), "InvalidLsn");
        }
    }

    #[test]
    fn displays_uppercase_without_padding() {
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0x1_0000_0000).to_string(), "1/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(format!("{:?}", Lsn(0xAB)), "Lsn(0/AB)");
    }

    #[test]
    fn display_and_parse_round_trip() {
        for v in [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0xDEAD_BEEF_0000_0001, u64::MAX] {
            assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }
    }

    #[test]
    fn orders_by_position_not_text() {
        // "9/0" < "10/0" numerically even though it sorts after it as text.
        let a: Lsn = "9/0".parse().unwrap();
        let b: Lsn = "10/0".parse().unwrap();
        assert!(a < b);
        assert!(Lsn::ZERO < Lsn(1));
        assert_eq!(b.bytes_since(a), 7 << 32);
        assert_eq!(a.bytes_since(b), 0);
    }

    #[test]
    fn serde_as_string() {
        let json = serde_json::to_string(&Lsn(0x16_B374_D848)).unwrap();
        assert_eq!(json, "\"16/B374D848\"");
        let back: Lsn = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Lsn(0x16_B374_D848));
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
        assert!(serde_json::from_str::<Lsn>("12").is_err());
    }
}
