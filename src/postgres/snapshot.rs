//! One read of a database's replication slots and publications, shared by every
//! relay on that server, database and role for one requeue interval.
//!
//! A healthy relay's reconcile only needs to learn that nothing changed: its slot
//! is there, ours and usable, its publication lists its table, and how far behind
//! it is. Read per relay, that is several statements (three of them on
//! `pg_replication_slots`) per relay per interval; read once for all of them, it is
//! three statements per database per interval, however many relays it serves.
//!
//! A snapshot only ever *confirms* the steady state (see
//! `binding::confirm`): every decision that creates, drops, takes or reports a
//! loss is made on a fresh, per-relay read, so a snapshot a few seconds old can
//! delay a report by at most its age, never cause a wrong action.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::binding::marker::{Marker, Ownership};
use super::binding::{Observation, Target};
use super::error::{col, query_error};
use super::objects::PublicationState;
use super::pool::Pool;
use super::provision::REPLICATION_GRANTED;
use super::slot::{SLOTS_SQL, slot_info};
use super::{OUTPUT_PLUGIN, PgConnectConfig, PgError, SlotInfo};

/// A slot as the snapshot saw it: what `slot_status` reads, and what `verify_slot`
/// checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRow {
    pub info: SlotInfo,
    pub logical: bool,
    pub temporary: bool,
}

impl SlotRow {
    /// What `objects::verify_slot` accepts: logical, pgoutput, this database, not a
    /// temporary slot of some session.
    pub fn usable_in(&self, database: &str) -> bool {
        self.logical
            && !self.temporary
            && self.info.plugin.as_deref() == Some(OUTPUT_PLUGIN)
            && self.info.database.as_deref() == Some(database)
    }
}

/// A publication with its ownership record, parsed once per snapshot.
pub struct PublicationRow {
    pub name: String,
    pub ownership: Ownership,
    pub(super) state: PublicationState,
}

/// What one read of a server, database and role found.
pub struct Snapshot {
    pub taken: Instant,
    pub wal_level: String,
    pub in_recovery: bool,
    /// The role may stream (REPLICATION, superuser, or a managed service's role).
    pub can_replicate: bool,
    pub system_identifier: String,
    pub database: String,
    /// `None` on a standby.
    pub current_lsn: Option<String>,
    pub slots: Vec<SlotRow>,
    pub publications: Vec<PublicationRow>,
}

impl Snapshot {
    pub fn slot(&self, name: &str) -> Option<&SlotRow> {
        self.slots.iter().find(|s| s.info.name == name)
    }

    pub fn publication(&self, name: &str) -> Option<&PublicationRow> {
        self.publications.iter().find(|p| p.name == name)
    }

    /// The server usable for logical replication as far as a snapshot can tell.
    pub fn replication_possible(&self) -> bool {
        self.wal_level == "logical" && !self.in_recovery && self.can_replicate && self.current_lsn.is_some()
    }

    /// What `binding::inspect` would have read for `t`.
    pub fn observation(&self, t: &Target<'_>) -> Observation {
        let mut publication = None;
        let mut slot_claims: Vec<Marker> = Vec::new();
        for p in &self.publications {
            if p.name == t.publication {
                publication = Some(p.ownership.clone());
            } else if let Some(m) = p.ownership.marker()
                && m.slot == t.slot
            {
                slot_claims.push(m.clone());
            }
        }
        Observation {
            system_identifier: self.system_identifier.clone(),
            database: self.database.clone(),
            current_lsn: self.current_lsn.clone().unwrap_or_default(),
            publication,
            slot: self.slot(t.slot).map(|s| s.info.clone()),
            slot_claims,
        }
    }
}

const ACTION: &str = "read the database's slots and publications";

/// Reads a snapshot: three statements, whatever the number of relays.
pub async fn take(client: &Client) -> Result<Snapshot, PgError> {
    let taken = Instant::now();
    let row = client
        .query_one(
            &format!(
                "SELECT current_setting('wal_level'),
                    pg_is_in_recovery(),
                    r.rolsuper OR {REPLICATION_GRANTED},
                    (SELECT system_identifier::text FROM pg_control_system()),
                    current_database()::text,
                    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
                    current_setting('server_version_num')::int4
             FROM pg_roles r WHERE r.rolname = current_user"
            ),
            &[],
        )
        .await
        .map_err(|e| query_error(ACTION, e))?;
    let version: i32 = col(&row, 6, ACTION)?;
    let current_lsn: Option<String> = col(&row, 5, ACTION)?;
    let mut snapshot = Snapshot {
        taken,
        wal_level: col(&row, 0, ACTION)?,
        in_recovery: col(&row, 1, ACTION)?,
        can_replicate: col(&row, 2, ACTION)?,
        system_identifier: col(&row, 3, ACTION)?,
        database: col(&row, 4, ACTION)?,
        current_lsn,
        slots: Vec::new(),
        publications: Vec::new(),
    };

    // The lag is measured against the position read with the slot rows, as
    // `slot_status` does it.
    let slots = client.query(SLOTS_SQL, &[]).await.map_err(|e| query_error(ACTION, e))?;
    for r in &slots {
        snapshot.slots.push(SlotRow {
            info: slot_info(r, ACTION)?,
            logical: col(r, 11, ACTION)?,
            temporary: col(r, 12, ACTION)?,
        });
    }

    // Row filters, column lists and schema publications exist from 15 on.
    let (filtered, schemas) = if version >= 150_000 {
        (
            "pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL",
            "(SELECT count(*) FROM pg_publication_namespace WHERE pnpubid = p.oid)",
        )
    } else {
        ("false", "0::int8")
    };
    let publications = client
        .query(
            &format!(
                "SELECT p.pubname::text, obj_description(p.oid, 'pg_publication'),
                        p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.pubviaroot,
                        coalesce(array_agg(n.nspname::text) FILTER (WHERE c.oid IS NOT NULL), '{{}}'),
                        coalesce(array_agg(c.relname::text) FILTER (WHERE c.oid IS NOT NULL), '{{}}'),
                        coalesce(bool_or({filtered}), false),
                        {schemas}
                 FROM pg_publication p
                 LEFT JOIN pg_publication_rel pr ON pr.prpubid = p.oid
                 LEFT JOIN pg_class c ON c.oid = pr.prrelid
                 LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
                 GROUP BY p.oid, p.pubname, p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete,
                          p.pubtruncate, p.pubviaroot"
            ),
            &[],
        )
        .await
        .map_err(|e| query_error(ACTION, e))?;
    for r in &publications {
        let schemas: Vec<String> = col(r, 8, ACTION)?;
        let names: Vec<String> = col(r, 9, ACTION)?;
        snapshot.publications.push(PublicationRow {
            name: col(r, 0, ACTION)?,
            ownership: Ownership::parse(col::<Option<String>>(r, 1, ACTION)?.as_deref()),
            state: PublicationState {
                all_tables: col(r, 2, ACTION)?,
                insert: col(r, 3, ACTION)?,
                update: col(r, 4, ACTION)?,
                delete: col(r, 5, ACTION)?,
                truncate: col(r, 6, ACTION)?,
                via_root: col(r, 7, ACTION)?,
                tables: schemas.into_iter().zip(names).collect(),
                filtered: col(r, 10, ACTION)?,
                schemas: col(r, 11, ACTION)?,
            },
        });
    }
    Ok(snapshot)
}

impl PublicationRow {
    /// Publishes exactly `table`, inserts only, as `objects::ensure_publication`
    /// leaves it.
    pub fn is_exactly(&self, table: &super::QualifiedTable) -> bool {
        self.state.is_exactly(table)
    }
}

/// The snapshots of every server, database and role the operator talks to. Cheap
/// to clone (shared).
///
/// One snapshot per key at a time: reconciles of relays on one database that need
/// a new snapshot at the same moment wait for one read instead of each making its
/// own.
#[derive(Clone, Default)]
pub struct Snapshots {
    cells: Arc<Mutex<HashMap<PgConnectConfig, (Cell, Instant)>>>,
}

type Cell = Arc<tokio::sync::Mutex<Held>>;

/// What a key's cell holds: the last snapshot, and when the last read failed.
#[derive(Default)]
struct Held {
    snapshot: Option<Arc<Snapshot>>,
    failed_at: Option<Instant>,
}

/// A key nobody asked for this long is forgotten: a relay deleted, or credentials
/// rotated (the old ones are a key of their own).
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Snapshots {
    fn cells(&self) -> std::sync::MutexGuard<'_, HashMap<PgConnectConfig, (Cell, Instant)>> {
        // A plain map of handles: a panic elsewhere cannot leave it inconsistent.
        self.cells.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cell(&self, cfg: &PgConnectConfig) -> Cell {
        let now = Instant::now();
        let mut cells = self.cells();
        cells.retain(|_, (_, used)| now.duration_since(*used) < FORGET_AFTER);
        let entry = cells.entry(Pool::key(cfg)).or_insert_with(|| (Cell::default(), now));
        entry.1 = now;
        entry.0.clone()
    }

    /// A snapshot of `cfg`'s database no older than `max_age`, read through `pool`
    /// when there is none. The flag says whether this call read it.
    pub async fn get(
        &self,
        pool: &Pool,
        cfg: &PgConnectConfig,
        max_age: Duration,
        timeout: Duration,
    ) -> Result<(Arc<Snapshot>, bool), PgError> {
        let cell = self.cell(cfg);
        let mut held = cell.lock().await;
        if let Some(s) = held.snapshot.as_ref()
            && s.taken.elapsed() < max_age
        {
            return Ok((s.clone(), false));
        }
        // A database that just failed to answer is not asked again by every relay
        // waiting here, one timeout after another: they go to their full passes,
        // which report the failure with their own bounds.
        if held.failed_at.is_some_and(|t| t.elapsed() < max_age) {
            return Err(PgError::Query {
                action: ACTION,
                code: None,
                detail: "the last read of this database failed moments ago".into(),
            });
        }
        let read = async {
            let client = pool.get(cfg).await?;
            let snapshot = take(&client).await?;
            // Only a read that finished hands its connection back (see `pool`).
            client.release();
            Ok::<_, PgError>(snapshot)
        };
        let result = match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Query {
                action: ACTION,
                code: None,
                detail: format!("no answer within {} s", timeout.as_secs()),
            }),
        };
        match result {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                *held = Held {
                    snapshot: Some(snapshot.clone()),
                    failed_at: None,
                };
                Ok((snapshot, true))
            }
            Err(e) => {
                *held = Held {
                    snapshot: None,
                    failed_at: Some(Instant::now()),
                };
                Err(e)
            }
        }
    }

    /// Forgets `cfg`'s snapshot: the operator just changed what it describes, and
    /// the other relays of that database should not wait an interval to see it.
    /// A read in flight is left alone: it may predate the change, but a snapshot
    /// only confirms, so the worst it does is send one relay through a full pass.
    pub fn invalidate(&self, cfg: &PgConnectConfig) {
        let cells = self.cells();
        if let Some((cell, _)) = cells.get(&Pool::key(cfg))
            && let Ok(mut held) = cell.try_lock()
        {
            held.snapshot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PgSslMode;

    /// A server nobody listens on: connecting fails at once.
    fn nowhere() -> PgConnectConfig {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        PgConnectConfig {
            host: "127.0.0.1".into(),
            port,
            dbname: "app".into(),
            user: "relay".into(),
            password: Some("secret".into()),
            ssl_mode: PgSslMode::Disable,
            ca_pem: None,
            application_name: "test".into(),
            allow_cleartext_password: false,
        }
    }

    #[tokio::test]
    async fn a_failed_read_is_not_repeated_by_every_waiting_relay() {
        let (snapshots, pool, cfg) = (Snapshots::default(), Pool::new(), nowhere());
        let age = Duration::from_secs(30);
        let first = snapshots.get(&pool, &cfg, age, Duration::from_secs(5)).await;
        let Err(first) = first else {
            panic!("nothing listens there")
        };
        assert!(!first.to_string().contains("moments ago"), "{first}");
        // The next relay of that database goes straight to its full pass.
        let second = snapshots.get(&pool, &cfg, age, Duration::from_secs(5)).await;
        let Err(second) = second else {
            panic!("nothing listens there")
        };
        assert!(second.to_string().contains("moments ago"), "{second}");
        // Once the interval is over, the database is asked again.
        let later = snapshots.get(&pool, &cfg, Duration::ZERO, Duration::from_secs(5)).await;
        let Err(later) = later else {
            panic!("nothing listens there")
        };
        assert!(!later.to_string().contains("moments ago"), "{later}");
        assert_eq!(snapshots.cells().len(), 1);
    }
}
