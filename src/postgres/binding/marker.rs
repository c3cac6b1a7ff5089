//! The ownership record the operator keeps on a relay's publication, as the
//! publication's comment (`COMMENT ON PUBLICATION`).
//!
//! Slots carry no comment, so the publication's record names the slot too: one
//! record says which relay (by uid, so a deleted and recreated relay of the same name
//! is a different owner) owns which publication and slot on which server, and where
//! the slot started. It lives next to the objects it describes, so it survives a lost
//! status, a restarted operator and a second operator instance, and a DBA can read
//! it with `\dRp+`.

use serde::{Deserialize, Serialize};

/// Every record starts with this, so a comment a human wrote is never mistaken for one.
const PREFIX: &str = "outbox-operator binding ";

/// Who owns a publication (and the slot it names), and the slot's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    /// `metadata.uid` of the owning `OutboxRelay`.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The replication slot this relay streams through.
    pub slot: String,
    /// `pg_control_system().system_identifier` of the server the slot was made on.
    pub system_identifier: String,
    /// Where the slot started; `None` while the slot is being created (the record is
    /// written first, so a crash between the two never leaves an unowned slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_created_lsn: Option<String>,
    /// RFC 3339 time of the slot's creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_created_at: Option<String>,
}

impl Marker {
    /// `namespace/name`, for messages.
    pub fn relay(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The comment text.
    pub fn to_comment(&self) -> String {
        // Serializing a struct of strings cannot fail.
        format!("{PREFIX}{}", serde_json::to_string(self).unwrap_or_default())
    }
}

/// What a publication's comment says about its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// No comment: made by hand, by another tool, or by an operator version that did
    /// not record owners.
    Unmarked,
    /// A comment that is not an ownership record.
    Foreign(String),
    Marked(Marker),
}

impl Ownership {
    pub fn parse(comment: Option<&str>) -> Ownership {
        let Some(text) = comment.map(str::trim).filter(|c| !c.is_empty()) else {
            return Ownership::Unmarked;
        };
        match text.strip_prefix(PREFIX).map(serde_json::from_str::<Marker>) {
            Some(Ok(m)) => Ownership::Marked(m),
            _ => Ownership::Foreign(text.to_string()),
        }
    }

    pub fn marker(&self) -> Option<&Marker> {
        match self {
            Ownership::Marked(m) => Some(m),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Marker {
        Marker {
            uid: "u-1".into(),
            namespace: "shop".into(),
            name: "orders".into(),
            slot: "outbox_shop_orders".into(),
            system_identifier: "7301".into(),
            slot_created_lsn: Some("0/16B3748".into()),
            slot_created_at: Some("2026-12-02T06:00:00Z".into()),
        }
    }

    #[test]
    fn round_trips_through_the_comment() {
        let c = m().to_comment();
        assert!(c.starts_with("outbox-operator binding {"), "{c}");
        assert_eq!(Ownership::parse(Some(&c)), Ownership::Marked(m()));
        let pending = Marker {
            slot_created_lsn: None,
            slot_created_at: None,
            ..m()
        };
        assert_eq!(
            Ownership::parse(Some(&pending.to_comment())),
            Ownership::Marked(pending)
        );
    }

    #[test]
    fn other_comments_are_not_records() {
        assert_eq!(Ownership::parse(None), Ownership::Unmarked);
        assert_eq!(Ownership::parse(Some("  ")), Ownership::Unmarked);
        assert_eq!(
            Ownership::parse(Some("orders feed, ask team-a")),
            Ownership::Foreign("orders feed, ask team-a".into())
        );
        // The prefix alone does not make a record.
        assert!(matches!(
            Ownership::parse(Some("outbox-operator binding {not json")),
            Ownership::Foreign(_)
        ));
        assert_eq!(m().relay(), "shop/orders");
    }
}
