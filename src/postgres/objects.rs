//! The relay's two PostgreSQL objects, one statement level down: create, check,
//! repair and drop the publication and the logical replication slot.
//!
//! Every function here is idempotent and safe to run on each reconcile, also by
//! two callers at once: existing objects are checked instead of recreated, and a
//! lost creation race counts as "already exists". None of them asks *whose* object
//! it touches: inside the crate only [`super::binding`], which checks ownership
//! first, calls them.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::PgError;
use super::error::{col, query_error};
use super::ident::{QualifiedTable, quote_ident, quote_literal, validate_identifier, validate_slot_name};

/// The only output plugin the relay decodes.
pub const OUTPUT_PLUGIN: &str = "pgoutput";

/// What an `ensure_*` call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioned {
    Created,
    /// Existed but had drifted and was repaired.
    Updated,
    Unchanged,
}

impl Provisioned {
    pub fn changed(self) -> bool {
        self != Provisioned::Unchanged
    }
}

/// Creates the publication for exactly `table`, inserts only, or repairs one that drifted.
///
/// Only inserts are published: updates, deletes and truncates of an outbox table are
/// never events (deleting relayed rows is housekeeping), and not publishing them
/// saves the server the work of decoding them. `publish_via_partition_root` makes
/// rows of a partitioned outbox arrive under the table's own name.
pub async fn ensure_publication(client: &Client, name: &str, table: &QualifiedTable) -> Result<Provisioned, PgError> {
    validate_identifier("publication name", name)?;
    let create = format!(
        "CREATE PUBLICATION {} FOR TABLE {table} WITH (publish = 'insert', publish_via_partition_root = true)",
        quote_ident(name)
    );
    if read_publication(client, name).await?.is_none() {
        match client.batch_execute(&create).await {
            Ok(()) => return Ok(Provisioned::Created),
            // Another caller created it between our look and our create; check theirs.
            Err(e) if lost_creation_race(&e) => {}
            Err(e) => return Err(publication_ddl_error("create the publication", table, e)),
        }
    }
    let Some(publication) = read_publication(client, name).await? else {
        // Dropped again right after the creation race; the next call creates it.
        return Err(PgError::Query {
            action: "create the publication",
            code: None,
            detail: "it was dropped concurrently; retrying will create it".into(),
        });
    };
    if publication.all_tables {
        return Err(PgError::PublicationConflict {
            publication: name.to_string(),
            detail: "it is FOR ALL TABLES and cannot be narrowed to one table; drop it or choose another name".into(),
        });
    }

    let mut changed = false;
    if !publication.lists_only(table) {
        let sql = format!("ALTER PUBLICATION {} SET TABLE {table}", quote_ident(name));
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| publication_ddl_error("set the publication's table", table, e))?;
        changed = true;
    }
    if !publication.options_ok() {
        let sql = format!(
            "ALTER PUBLICATION {} SET (publish = 'insert', publish_via_partition_root = true)",
            quote_ident(name)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| query_error("set the publication's options", e))?;
        changed = true;
    }
    Ok(if changed {
        Provisioned::Updated
    } else {
        Provisioned::Unchanged
    })
}

/// The table can vanish between [`check_prerequisites`] and the DDL here.
fn publication_ddl_error(action: &'static str, table: &QualifiedTable, e: tokio_postgres::Error) -> PgError {
    if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
        return PgError::TableNotFound {
            table: table.unquoted(),
        };
    }
    query_error(action, e)
}

/// Two callers creating the same object: the loser gets `duplicate_object` when the
/// winner had committed before its check, or `unique_violation` (from the catalog's
/// unique index) when both passed the check and the loser waited on the winner's commit.
pub(super) fn lost_creation_race(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::DUPLICATE_OBJECT) || e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

pub(super) struct PublicationState {
    pub(super) all_tables: bool,
    pub(super) insert: bool,
    pub(super) update: bool,
    pub(super) delete: bool,
    pub(super) truncate: bool,
    pub(super) via_root: bool,
    /// (schema, table) of each listed table.
    pub(super) tables: Vec<(String, String)>,
    /// Some listed table has a row filter or a column list (PostgreSQL 15+).
    pub(super) filtered: bool,
    /// Schemas published with `TABLES IN SCHEMA` (PostgreSQL 15+).
    pub(super) schemas: i64,
}

impl PublicationState {
    /// Lists `table` and nothing else, whole (no row filter or column list).
    pub(super) fn lists_only(&self, table: &QualifiedTable) -> bool {
        self.tables.len() == 1
            && self.tables[0].0 == table.schema
            && self.tables[0].1 == table.name
            && !self.filtered
            && self.schemas == 0
    }

    /// Inserts only, rows of partitions under the root's name.
    pub(super) fn options_ok(&self) -> bool {
        self.insert && !self.update && !self.delete && !self.truncate && self.via_root
    }

    /// What [`ensure_publication`] leaves: nothing for it to repair.
    pub(super) fn is_exactly(&self, table: &QualifiedTable) -> bool {
        !self.all_tables && self.lists_only(table) && self.options_ok()
    }
}

pub(super) async fn read_publication(client: &Client, name: &str) -> Result<Option<PublicationState>, PgError> {
    let action = "read the publication";
    let Some(row) = client
        .query_opt(
            "SELECT oid, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot,
                    current_setting('server_version_num')::int4
             FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(|e| query_error(action, e))?
    else {
        return Ok(None);
    };
    let oid: u32 = col(&row, 0, action)?;
    let version: i32 = col(&row, 7, action)?;
    // Row filters, column lists and schema publications only exist from 15 on.
    let (filter_expr, schemas_sql) = if version >= 150_000 {
        (
            "pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL",
            "SELECT count(*) FROM pg_publication_namespace WHERE pnpubid = $1",
        )
    } else {
        ("false", "SELECT 0::int8 WHERE $1::oid IS NOT NULL")
    };
    let tables = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, {filter_expr}
                 FROM pg_publication_rel pr
                 JOIN pg_class c ON c.oid = pr.prrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE pr.prpubid = $1"
            ),
            &[&oid],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    let schemas_row = client
        .query_one(schemas_sql, &[&oid])
        .await
        .map_err(|e| query_error(action, e))?;
    let mut listed = Vec::with_capacity(tables.len());
    let mut filtered = false;
    for r in &tables {
        listed.push((col(r, 0, action)?, col(r, 1, action)?));
        filtered |= col::<bool>(r, 2, action)?;
    }
    Ok(Some(PublicationState {
        all_tables: col(&row, 1, action)?,
        insert: col(&row, 2, action)?,
        update: col(&row, 3, action)?,
        delete: col(&row, 4, action)?,
        truncate: col(&row, 5, action)?,
        via_root: col(&row, 6, action)?,
        tables: listed,
        filtered,
        schemas: col(&schemas_row, 0, action)?,
    }))
}

/// Creates the logical replication slot (plugin `pgoutput`) unless it exists, and
/// checks that an existing one is usable: logical, `pgoutput`, in this database,
/// not temporary.
///
/// Creating a slot waits until transactions running at that moment have finished,
/// so a long-running transaction on the server delays this call.
pub async fn ensure_slot(client: &Client, name: &str) -> Result<Provisioned, PgError> {
    validate_slot_name(name)?;
    if read_slot(client, name).await?.is_none() {
        match client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, $2)",
                &[&name, &OUTPUT_PLUGIN],
            )
            .await
        {
            Ok(_) => return Ok(Provisioned::Created),
            Err(e) if lost_creation_race(&e) => {}
            Err(e) => return Err(slot_create_error(client, e).await),
        }
    }
    // A slot another session is still creating (waiting for running transactions)
    // is listed with no plugin yet; wait for it rather than call it someone else's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Some(slot) = read_slot(client, name).await?
        && slot.plugin.as_deref().unwrap_or_default().is_empty()
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    match verify_slot(client, name).await? {
        true => Ok(Provisioned::Unchanged),
        // Dropped again right after the creation race; the next call creates it.
        false => Err(PgError::Query {
            action: "create the replication slot",
            code: None,
            detail: "it was dropped concurrently; retrying will create it".into(),
        }),
    }
}

/// Checks that an existing slot is usable (logical, `pgoutput`, in this database, not
/// temporary); `false` when there is no such slot. Never creates one.
pub async fn verify_slot(client: &Client, name: &str) -> Result<bool, PgError> {
    validate_slot_name(name)?;
    let Some(slot) = read_slot(client, name).await? else {
        return Ok(false);
    };
    let problem = if slot.slot_type != "logical" {
        Some(format!("it is a {} slot, not a logical one", slot.slot_type))
    } else if slot.plugin.as_deref() != Some(OUTPUT_PLUGIN) {
        Some(format!(
            "it uses output plugin {:?}, not {OUTPUT_PLUGIN:?}",
            slot.plugin.unwrap_or_default()
        ))
    } else if slot.database.as_deref() != Some(slot.current_database.as_str()) {
        Some(format!(
            "it belongs to database {:?}, not {:?}",
            slot.database.unwrap_or_default(),
            slot.current_database
        ))
    } else if slot.temporary {
        Some("it is a temporary slot of another session".into())
    } else {
        None
    };
    match problem {
        Some(detail) => Err(PgError::SlotConflict {
            slot: name.to_string(),
            detail,
        }),
        None => Ok(true),
    }
}

/// Creates the slot and returns the LSN it starts at. Unlike [`ensure_slot`] this
/// fails when the slot exists: whoever made it first owns it.
pub async fn create_slot(client: &Client, name: &str) -> Result<String, PgError> {
    validate_slot_name(name)?;
    match client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, $2)",
            &[&name, &OUTPUT_PLUGIN],
        )
        .await
    {
        Ok(row) => col(&row, 0, "create the replication slot"),
        Err(e) if lost_creation_race(&e) => Err(PgError::SlotConflict {
            slot: name.to_string(),
            detail: "someone else created it at the same moment".into(),
        }),
        Err(e) => Err(slot_create_error(client, e).await),
    }
}

/// Every publication of the database with its comment.
pub async fn publication_comments(client: &Client) -> Result<Vec<(String, Option<String>)>, PgError> {
    let action = "read the publications";
    let rows = client
        .query(
            "SELECT pubname::text, obj_description(oid, 'pg_publication') FROM pg_publication",
            &[],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    rows.iter()
        .map(|r| Ok((col(r, 0, action)?, col(r, 1, action)?)))
        .collect()
}

/// Sets the publication's comment (`None` removes it).
pub async fn comment_publication(client: &Client, name: &str, comment: Option<&str>) -> Result<(), PgError> {
    validate_identifier("publication name", name)?;
    let text = comment.map(quote_literal).unwrap_or_else(|| "NULL".into());
    client
        .batch_execute(&format!("COMMENT ON PUBLICATION {} IS {text}", quote_ident(name)))
        .await
        .map_err(|e| query_error("record the publication's owner", e))
}

async fn slot_create_error(client: &Client, e: tokio_postgres::Error) -> PgError {
    // The last free slot can be taken between check_prerequisites and here.
    if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED) {
        let counts = client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int8, (SELECT count(*) FROM pg_replication_slots)",
                &[],
            )
            .await;
        let action = "count replication slots";
        if let Ok(row) = counts
            && let (Ok(max), Ok(used)) = (col(&row, 0, action), col(&row, 1, action))
        {
            return PgError::SlotLimitReached { max, used };
        }
    }
    query_error("create the replication slot", e)
}

struct SlotRow {
    slot_type: String,
    plugin: Option<String>,
    database: Option<String>,
    temporary: bool,
    current_database: String,
}

async fn read_slot(client: &Client, name: &str) -> Result<Option<SlotRow>, PgError> {
    let action = "read the replication slot";
    let row = client
        .query_opt(
            "SELECT slot_type, plugin::text, database::text, temporary, current_database()::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(|e| query_error(action, e))?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(SlotRow {
        slot_type: col(&r, 0, action)?,
        plugin: col(&r, 1, action)?,
        database: col(&r, 2, action)?,
        temporary: col(&r, 3, action)?,
        current_database: col(&r, 4, action)?,
    }))
}

/// How often [`drop_slot`] tries again when the slot is taken back between freeing it and dropping it.
const DROP_ATTEMPTS: u32 = 5;
/// How long [`drop_slot`] waits for a terminated holder to let go of the slot.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Drops the slot; returns whether it existed. A session streaming from the slot
/// is terminated first (a slot cannot be dropped while active): this is meant for
/// deleting a relay, whose worker is going away anyway.
pub async fn drop_slot(client: &Client, name: &str) -> Result<bool, PgError> {
    validate_slot_name(name)?;
    let mut last_pid = None;
    for _ in 0..DROP_ATTEMPTS {
        let Some(pid) = active_pid(client, name).await? else {
            return Ok(false);
        };
        if let Some(pid) = pid {
            last_pid = Some(pid);
            client
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(|e| query_error("terminate the session holding the replication slot", e))?;
            wait_until_released(client, name).await?;
        }
        match client.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await {
            Ok(_) => return Ok(true),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => return Ok(false),
            // Taken again (e.g. a restarting worker) right after it was freed: go round.
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => continue,
            Err(e) => return Err(query_error("drop the replication slot", e)),
        }
    }
    Err(PgError::SlotInUse {
        slot: name.to_string(),
        pid: last_pid,
    })
}

/// Ends the session streaming from the slot, if any, and waits (bounded) until the
/// slot is free. For a deletion that gives up on its drain: the worker was scaled to
/// zero, but a pod that is still shutting down may hold the slot.
pub async fn free_slot(client: &Client, name: &str) -> Result<(), PgError> {
    validate_slot_name(name)?;
    if let Some(Some(pid)) = active_pid(client, name).await? {
        client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .map_err(|e| query_error("terminate the session holding the replication slot", e))?;
        wait_until_released(client, name).await?;
    }
    Ok(())
}

/// `None`: no such slot; `Some(None)`: exists, inactive; `Some(Some(pid))`: held by `pid`.
async fn active_pid(client: &Client, name: &str) -> Result<Option<Option<i32>>, PgError> {
    let row = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(|e| query_error("read the replication slot", e))?;
    row.map(|r| col(&r, 0, "read the replication slot")).transpose()
}

async fn wait_until_released(client: &Client, name: &str) -> Result<(), PgError> {
    let deadline = Instant::now() + RELEASE_WAIT;
    while Instant::now() < deadline {
        match active_pid(client, name).await? {
            None | Some(None) => return Ok(()),
            Some(Some(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok(())
}

/// Drops the publication; returns whether it existed.
pub async fn drop_publication(client: &Client, name: &str) -> Result<bool, PgError> {
    validate_identifier("publication name", name)?;
    let existed = read_publication(client, name).await?.is_some();
    if existed {
        let sql = format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name));
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| query_error("drop the publication", e))?;
    }
    Ok(existed)
}
