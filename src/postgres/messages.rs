//! The PostgreSQL objects of a tableless relay (`source: Messages`): a publication
//! that lists no table, and the SQL function applications call to emit an event.
//!
//! pgoutput needs `publication_names` even when only messages are wanted, and a
//! publication with no table is valid (`CREATE PUBLICATION p` with nothing after
//! it): it sends no row, and messages are not filtered by publications at all.

use tokio_postgres::Client;

use super::error::query_error;
use super::ident::{quote_ident, quote_literal, validate_identifier};
use super::objects::{Provisioned, lost_creation_race, read_publication};
use super::{PgError, QualifiedTable};

/// Creates the relay's publication with no table unless it exists, and checks that
/// an existing one publishes nothing: rows it sent would not be this relay's
/// events, and the relay ignores them, so a table in it only costs decoding work.
pub async fn ensure_publication(client: &Client, name: &str) -> Result<Provisioned, PgError> {
    validate_identifier("publication name", name)?;
    let mut provisioned = Provisioned::Unchanged;
    if read_publication(client, name).await?.is_none() {
        let create = format!("CREATE PUBLICATION {} WITH (publish = 'insert')", quote_ident(name));
        match client.batch_execute(&create).await {
            Ok(()) => provisioned = Provisioned::Created,
            // Another caller created it between our look and our create; check theirs.
            Err(e) if lost_creation_race(&e) => {}
            Err(e) => return Err(query_error("create the publication", e)),
        }
    }
    let Some(p) = read_publication(client, name).await? else {
        return Err(PgError::Query {
            action: "create the publication",
            code: None,
            detail: "it was dropped concurrently; retrying will create it".into(),
        });
    };
    if p.all_tables || !p.tables.is_empty() || p.schemas > 0 {
        return Err(PgError::PublicationConflict {
            publication: name.to_string(),
            detail: "a relay with source Messages reads no table, but this publication publishes tables; \
                     drop it (the operator creates an empty one) or choose another publication name"
                .into(),
        });
    }
    Ok(provisioned)
}

/// The emit function: `fn(aggregate_type, aggregate_id, event_type, payload jsonb
/// [, headers jsonb]) RETURNS pg_lsn`, writing one transactional message in the
/// envelope `crate::relay::message` decodes (JSON header line, newline, payload).
///
/// Why plpgsql: a NULL aggregate id (the record key) fails the caller's
/// transaction at once instead of reaching the relay as an event it has to park.
/// `search_path` is pinned so no object of the caller's can stand in for the
/// built-ins. `SECURITY INVOKER` (the default): the function grants nothing
/// beyond what `pg_logical_emit_message` itself allows the caller.
pub fn emit_function_ddl(function: &QualifiedTable, prefix: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {function}(
  aggregate_type text,
  aggregate_id text,
  event_type text,
  payload jsonb,
  headers jsonb DEFAULT NULL
) RETURNS pg_lsn
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $outbox_emit$
BEGIN
  IF aggregate_id IS NULL THEN
    RAISE EXCEPTION 'aggregate_id must not be NULL: it is the Kafka record key';
  END IF;
  -- true: transactional, so the message is decoded only if this transaction commits.
  RETURN pg_logical_emit_message(
    true,
    {prefix},
    json_strip_nulls(json_build_object(
      'id', gen_random_uuid(),
      'aggregateType', aggregate_type,
      'aggregateId', aggregate_id,
      'type', event_type,
      'headers', headers
    ))::text || E'\\n' || COALESCE(payload::text, '')
  );
END
$outbox_emit$",
        prefix = quote_literal(prefix)
    )
}

/// The comment on the function: says who keeps it, for DBAs.
fn comment_ddl(function: &QualifiedTable, prefix: &str) -> String {
    format!(
        "COMMENT ON FUNCTION {function}(text, text, text, jsonb, jsonb) IS {}",
        quote_literal(&format!(
            "Emits an outbox event as a transactional logical decoding message with prefix {prefix:?}; \
             kept by the outbox operator (CREATE OR REPLACE on every reconcile)."
        ))
    )
}

/// Creates or replaces the emit function. Idempotent; run on every reconcile so
/// a changed prefix or a dropped function is put right.
pub async fn ensure_emit_function(client: &Client, function: &QualifiedTable, prefix: &str) -> Result<(), PgError> {
    if prefix.contains('$') || prefix.contains('\0') {
        return Err(PgError::Query {
            action: "create the emit function",
            code: None,
            detail: format!("message prefix {prefix:?} may not contain '$' or NUL"),
        });
    }
    let sql = format!(
        "{};\n{}",
        emit_function_ddl(function, prefix),
        comment_ddl(function, prefix)
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| query_error("create the emit function", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_function_quotes_its_name_and_prefix() {
        let f = QualifiedTable::new("App", "emit").unwrap();
        let sql = emit_function_ddl(&f, "it's");
        assert!(sql.starts_with("CREATE OR REPLACE FUNCTION \"App\".\"emit\"("), "{sql}");
        assert!(
            sql.contains("pg_logical_emit_message(\n    true,\n    'it''s',"),
            "{sql}"
        );
        assert!(sql.contains("SET search_path = pg_catalog, pg_temp"));
        assert!(
            comment_ddl(&f, "p").starts_with("COMMENT ON FUNCTION \"App\".\"emit\"(text, text, text, jsonb, jsonb)")
        );
    }
}
