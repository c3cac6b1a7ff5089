//! Quoting of SQL identifiers and literals, and schema-qualified table names.
//!
//! DDL such as `CREATE PUBLICATION` cannot take bind parameters, so names that come
//! from a resource have to be spliced into SQL text. Every name is quoted, which
//! both keeps hostile input inert and means names are used exactly as written
//! (PostgreSQL would otherwise fold unquoted names to lower case).

use std::fmt;
use std::str::FromStr;

use super::PgError;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1). Longer names are silently
/// truncated by the server, so a catalog lookup by the full name would never match.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Quotes an identifier: `a"b` becomes `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    enclose_doubling(name, '"')
}

/// Quotes a string literal for a replication command such as
/// `START_REPLICATION ... (option 'value')`: `it's` becomes `'it''s'`, and
/// nothing else changes.
///
/// The walsender's command scanner knows neither backslash escapes nor `E'...'`
/// strings: a backslash is an ordinary character there, and the `E'...'` form
/// that [`quote_literal`] gives values with a backslash would be a syntax error.
pub fn quote_replication_literal(value: &str) -> String {
    enclose_doubling(value, '\'')
}

/// `s` between two `quote`s, with every `quote` inside doubled.
fn enclose_doubling(s: &str, quote: char) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        if c == quote {
            out.push(quote);
        }
        out.push(c);
    }
    out.push(quote);
    out
}

/// Quotes a string literal: `it's` becomes `'it''s'`.
///
/// Like the server's own `quote_literal`, a value containing a backslash is written
/// as an `E'...'` string with the backslashes doubled, so the result means the same
/// whether or not `standard_conforming_strings` is on.
pub fn quote_literal(value: &str) -> String {
    let has_backslash = value.contains('\\');
    let mut out = String::with_capacity(value.len() + 3);
    if has_backslash {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Checks that `name` can be used verbatim as a PostgreSQL identifier.
pub fn validate_identifier(what: &'static str, name: &str) -> Result<(), PgError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_IDENTIFIER_BYTES {
        "is longer than 63 bytes (PostgreSQL would truncate it)"
    } else {
        return reject_nul(what, name);
    };
    Err(PgError::InvalidName {
        what,
        input: name.to_string(),
        reason,
    })
}

/// Refuses a value with a NUL character. No PostgreSQL message can carry one
/// (the protocol's strings end at the first NUL), so such a name or value is
/// better reported as what it is than as a query that fails to encode.
pub fn reject_nul(what: &'static str, value: &str) -> Result<(), PgError> {
    if value.contains('\0') {
        return Err(PgError::InvalidName {
            what,
            input: value.to_string(),
            reason: "must not contain a NUL character",
        });
    }
    Ok(())
}

/// Checks a replication slot name against the server's rule (`[a-z0-9_]{1,63}`), so
/// a bad name is reported as a spec problem rather than as a failed query.
pub fn validate_slot_name(name: &str) -> Result<(), PgError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_IDENTIFIER_BYTES {
        "is longer than 63 bytes"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        "may contain only lower-case letters, digits and underscores"
    } else {
        return Ok(());
    };
    Err(PgError::InvalidName {
        what: "replication slot name",
        input: name.to_string(),
        reason,
    })
}

/// A table name with its schema, e.g. from `spec.outbox.table` = `public.outbox`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QualifiedTable {
    pub schema: String,
    pub name: String,
}

impl QualifiedTable {
    /// Builds a name from its two parts, checking each.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Result<Self, PgError> {
        let schema = schema.into();
        let name = name.into();
        validate_identifier("schema name", &schema)?;
        validate_identifier("table name", &name)?;
        Ok(Self { schema, name })
    }

    /// Parses `schema.table`. Exactly one dot is required: the names are taken
    /// verbatim (no quoting syntax), so a second dot would make the split ambiguous.
    pub fn parse(input: &str) -> Result<Self, PgError> {
        let invalid = |reason| PgError::InvalidName {
            what: "table",
            input: input.to_string(),
            reason,
        };
        let mut parts = input.split('.');
        let (Some(schema), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid("must be written as schema.table with exactly one dot"));
        };
        if schema.is_empty() || name.is_empty() {
            return Err(invalid("must be written as schema.table with both parts non-empty"));
        }
        Self::new(schema, name)
    }

    /// The name as written in a resource: `schema.table`, unquoted.
    pub fn unquoted(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

impl fmt::Display for QualifiedTable {
    /// The quoted form, ready to splice into SQL: `"schema"."table"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl FromStr for QualifiedTable {
    type Err = PgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("outbox"), r#""outbox""#);
        assert_eq!(quote_ident("Outbox"), r#""Outbox""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_ident(r#""""#), r#""""""""#);
        assert_eq!(quote_ident(""), r#""""#);
    }

    #[test]
    fn hostile_identifier_stays_one_identifier() {
        let evil = r#"x"; DROP TABLE users; --"#;
        let q = quote_ident(evil);
        assert_eq!(q, r#""x""; DROP TABLE users; --""#);
        // Every quote inside is doubled, so the only unpaired quotes are the outer ones.
        let inner = &q[1..q.len() - 1];
        assert_eq!(inner.replace("\"\"", "").matches('"').count(), 0);
    }

    #[test]
    fn quotes_literals() {
        assert_eq!(quote_literal("insert"), "'insert'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("'; DROP TABLE t; --"), "'''; DROP TABLE t; --'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
        assert_eq!(quote_literal(""), "''");
    }

    #[test]
    fn quotes_replication_literals() {
        assert_eq!(quote_replication_literal("1"), "'1'");
        assert_eq!(quote_replication_literal("it's"), "'it''s'");
        // No escapes in the replication grammar: a backslash stays as it is.
        assert_eq!(quote_replication_literal(r"a\b"), r"'a\b'");
        assert_eq!(quote_replication_literal(r"a\'b"), r"'a\''b'");
        assert_eq!(quote_replication_literal(""), "''");
    }

    #[test]
    fn nul_is_rejected() {
        assert!(reject_nul("option", "proto_version").is_ok());
        assert!(reject_nul("option", "").is_ok());
        let err = reject_nul("slot name", "a\0b").unwrap_err();
        assert_eq!(err.category(), "InvalidSpec");
        assert!(err.to_string().contains("NUL"), "{err}");
        // Identifiers are checked for NUL as well, with the same message.
        assert_eq!(validate_identifier("slot name", "a\0b").unwrap_err(), err);
    }

    #[test]
    fn parses_qualified_table() {
        let t = QualifiedTable::parse("public.outbox").unwrap();
        assert_eq!(t.schema, "public");
        assert_eq!(t.name, "outbox");
        assert_eq!(t.to_string(), r#""public"."outbox""#);
        assert_eq!(t.unquoted(), "public.outbox");
        let mixed: QualifiedTable = "Sales.Outbox$1".parse().unwrap();
        assert_eq!(mixed.to_string(), r#""Sales"."Outbox$1""#);
    }

    #[test]
    fn display_quotes_hostile_parts() {
        let t = QualifiedTable::new(r#"we"ird"#, "ta'ble; --").unwrap();
        assert_eq!(t.to_string(), r#""we""ird"."ta'ble; --""#);
    }

    #[test]
    fn rejects_bad_tables() {
        for bad in ["outbox", "a.b.c", ".outbox", "public.", "", ".", "a\0b.c"] {
            let err = QualifiedTable::parse(bad).unwrap_err();
            assert_eq!(err.category(), "InvalidSpec", "{bad:?}");
        }
        let long = format!("public.{}", "x".repeat(64));
        assert!(QualifiedTable::parse(&long).is_err());
        let max = format!("public.{}", "x".repeat(63));
        assert!(QualifiedTable::parse(&max).is_ok());
    }

    #[test]
    fn identifier_length_counts_bytes() {
        // 32 two-byte characters: 64 bytes, one more than PostgreSQL keeps.
        assert!(validate_identifier("t", &"é".repeat(32)).is_err());
        assert!(validate_identifier("t", &"é".repeat(31)).is_ok());
    }

    #[test]
    fn slot_names() {
        assert!(validate_slot_name("outbox_default_orders").is_ok());
        assert!(validate_slot_name(&"a".repeat(63)).is_ok());
        for bad in ["", "Upper", "with-dash", "sp ace", "quo\"te", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad:?}");
        }
    }
}
