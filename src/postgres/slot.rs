//! What the server says about a replication slot, and how worrying its lag is.

use tokio_postgres::Client;

use super::PgError;
use super::error::{col, query_error};
use crate::api::conditions::reasons;
use crate::api::{LagThresholds, SlotStatus};

/// One row of `pg_replication_slots`, plus the lag figures derived from it.
/// LSNs are kept as PostgreSQL prints them (`16/B374D848`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    /// Output plugin; `None` for a physical slot.
    pub plugin: Option<String>,
    /// Database of a logical slot; `None` for a physical slot.
    pub database: Option<String>,
    /// A session is streaming from the slot.
    pub active: bool,
    pub active_pid: Option<i32>,
    /// Oldest WAL the slot still needs; the server keeps everything from here on.
    pub restart_lsn: Option<String>,
    /// Position up to which the consumer confirmed it has processed the stream.
    pub confirmed_flush_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot loses WAL it needs
    /// (`None` when `max_slot_wal_keep_size` is unlimited).
    pub safe_wal_size: Option<i64>,
    /// Bytes from the confirmed position to the server's current WAL position:
    /// how far the relay is behind.
    pub lag_bytes: Option<i64>,
    /// Bytes from `restart_lsn` to the server's current position: the disk the slot pins.
    pub retained_bytes: Option<i64>,
}

impl SlotInfo {
    /// The slot part of the resource's status.
    pub fn to_status(&self) -> SlotStatus {
        SlotStatus {
            name: self.name.clone(),
            active: self.active,
            confirmed_flush_lsn: self.confirmed_flush_lsn.clone(),
            wal_status: self.wal_status.clone(),
            lag_bytes: self.lag_bytes,
        }
    }

    /// [`classify_lag`] applied to this slot.
    pub fn lag_level(&self, thresholds: &LagThresholds) -> LagLevel {
        classify_lag(self.lag_bytes, self.wal_status.as_deref(), thresholds)
    }
}

const ACTION: &str = "read the replication slot's status";

/// Every slot with its lag, plus (last two columns) whether it is logical and
/// temporary. pg_current_wal_lsn() fails on a standby; the lag is then unknown
/// rather than an error, so a status update still shows what the slot row says.
/// Shared with `snapshot`, which reads every slot at once.
pub(super) const SLOTS_SQL: &str = "WITH cur AS (
        SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END AS lsn
     )
     SELECT s.slot_name::text, s.plugin::text, s.database::text, s.active, s.active_pid,
            s.restart_lsn::text, s.confirmed_flush_lsn::text, s.wal_status, s.safe_wal_size,
            pg_wal_lsn_diff(cur.lsn, s.confirmed_flush_lsn)::int8,
            pg_wal_lsn_diff(cur.lsn, s.restart_lsn)::int8,
            s.slot_type = 'logical', s.temporary
     FROM pg_replication_slots s, cur";

/// A row of [`SLOTS_SQL`]; `action` names the read in errors.
pub(super) fn slot_info(r: &tokio_postgres::Row, action: &'static str) -> Result<SlotInfo, PgError> {
    Ok(SlotInfo {
        name: col(r, 0, action)?,
        plugin: col(r, 1, action)?,
        database: col(r, 2, action)?,
        active: col(r, 3, action)?,
        active_pid: col(r, 4, action)?,
        restart_lsn: col(r, 5, action)?,
        confirmed_flush_lsn: col(r, 6, action)?,
        wal_status: col(r, 7, action)?,
        safe_wal_size: col(r, 8, action)?,
        lag_bytes: col(r, 9, action)?,
        retained_bytes: col(r, 10, action)?,
    })
}

/// Reads the slot; `None` when it does not exist.
pub async fn slot_status(client: &Client, name: &str) -> Result<Option<SlotInfo>, PgError> {
    let row = client
        .query_opt(&format!("{SLOTS_SQL} WHERE s.slot_name = $1"), &[&name])
        .await
        .map_err(|e| query_error(ACTION, e))?;
    row.map(|r| slot_info(&r, ACTION)).transpose()
}

/// How far behind a slot is, worst last (so levels compare with `<`/`max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LagLevel {
    Ok,
    Warning,
    Critical,
    /// The server removed WAL the slot still needed: events are gone, the slot is unusable.
    Lost,
}

impl LagLevel {
    /// The condition reason for this level.
    pub fn reason(self) -> &'static str {
        match self {
            LagLevel::Ok => reasons::LAG_OK,
            LagLevel::Warning => reasons::LAG_WARNING,
            LagLevel::Critical => reasons::LAG_CRITICAL,
            LagLevel::Lost => reasons::WAL_LOST,
        }
    }
}

/// Classifies a slot's lag against the resource's thresholds.
///
/// `wal_status = lost` wins over any byte count. `unreserved` counts as critical
/// whatever the lag: the server has already given up keeping that WAL, and the next
/// checkpoint may delete it. An unknown lag (e.g. no confirmed position yet) is `Ok`:
/// there is nothing to alert on.
pub fn classify_lag(lag_bytes: Option<i64>, wal_status: Option<&str>, thresholds: &LagThresholds) -> LagLevel {
    if wal_status == Some("lost") {
        return LagLevel::Lost;
    }
    let by_bytes = match lag_bytes {
        Some(lag) if lag >= thresholds.critical_bytes => LagLevel::Critical,
        Some(lag) if lag >= thresholds.warning_bytes => LagLevel::Warning,
        _ => LagLevel::Ok,
    };
    if wal_status == Some("unreserved") {
        by_bytes.max(LagLevel::Critical)
    } else {
        by_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn th() -> LagThresholds {
        LagThresholds {
            warning_bytes: 100,
            critical_bytes: 1000,
        }
    }

    #[test]
    fn by_bytes() {
        assert_eq!(classify_lag(Some(0), Some("reserved"), &th()), LagLevel::Ok);
        assert_eq!(classify_lag(Some(99), Some("reserved"), &th()), LagLevel::Ok);
        assert_eq!(classify_lag(Some(100), Some("reserved"), &th()), LagLevel::Warning);
        assert_eq!(classify_lag(Some(999), Some("extended"), &th()), LagLevel::Warning);
        assert_eq!(classify_lag(Some(1000), Some("reserved"), &th()), LagLevel::Critical);
        assert_eq!(classify_lag(Some(i64::MAX), None, &th()), LagLevel::Critical);
    }

    #[test]
    fn negative_or_unknown_lag_is_ok() {
        // A consumer can confirm a position past the one sampled as "current".
        assert_eq!(classify_lag(Some(-5), Some("reserved"), &th()), LagLevel::Ok);
        assert_eq!(classify_lag(None, None, &th()), LagLevel::Ok);
    }

    #[test]
    fn wal_status_escalates() {
        assert_eq!(classify_lag(Some(0), Some("lost"), &th()), LagLevel::Lost);
        assert_eq!(classify_lag(None, Some("lost"), &th()), LagLevel::Lost);
        assert_eq!(classify_lag(Some(0), Some("unreserved"), &th()), LagLevel::Critical);
        assert_eq!(classify_lag(Some(5000), Some("unreserved"), &th()), LagLevel::Critical);
        assert_eq!(classify_lag(Some(0), Some("extended"), &th()), LagLevel::Ok);
    }

    #[test]
    fn default_thresholds() {
        let d = LagThresholds::default();
        assert_eq!(classify_lag(Some(255 * 1024 * 1024), None, &d), LagLevel::Ok);
        assert_eq!(classify_lag(Some(256 * 1024 * 1024), None, &d), LagLevel::Warning);
        assert_eq!(classify_lag(Some(4 * 1024 * 1024 * 1024), None, &d), LagLevel::Critical);
    }

    #[test]
    fn reasons_and_order() {
        assert_eq!(LagLevel::Ok.reason(), "LagWithinThresholds");
        assert_eq!(LagLevel::Warning.reason(), "LagWarning");
        assert_eq!(LagLevel::Critical.reason(), "LagCritical");
        assert_eq!(LagLevel::Lost.reason(), "WalLost");
        assert!(LagLevel::Ok < LagLevel::Warning && LagLevel::Critical < LagLevel::Lost);
    }

    #[test]
    fn status_from_info() {
        let info = SlotInfo {
            name: "s".into(),
            plugin: Some("pgoutput".into()),
            database: Some("app".into()),
            active: true,
            active_pid: Some(42),
            restart_lsn: Some("0/10".into()),
            confirmed_flush_lsn: Some("0/20".into()),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            lag_bytes: Some(7),
            retained_bytes: Some(30),
        };
        let st = info.to_status();
        assert_eq!(st.name, "s");
        assert!(st.active);
        assert_eq!(st.confirmed_flush_lsn.as_deref(), Some("0/20"));
        assert_eq!(st.lag_bytes, Some(7));
        assert_eq!(info.lag_level(&th()), LagLevel::Ok);
    }
}
