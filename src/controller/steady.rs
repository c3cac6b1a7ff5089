//! The steady pass: a healthy relay's reconcile confirmed from the shared snapshot
//! of its database (`postgres::snapshot`) instead of its own statements.
//!
//! At a hundred relays most reconciles find nothing changed. Each used to run the
//! full check (server settings, the table and its columns, the publication, the
//! slot, three reads of `pg_replication_slots`) on its own; now a relay that was
//! healthy at its current generation, whose worker reports no trouble, and whose
//! full check is recent enough, is confirmed from one read shared by its whole
//! database. Anything the snapshot does not confirm (see `binding::confirm`) falls
//! through to the full pass, which reads this relay's objects fresh and is the
//! only pass that creates, drops, takes over or reports a loss.
//!
//! What only the full pass checks (a mapped column dropped, a privilege revoked)
//! is still checked every [`FULL_EVERY`] requeue intervals, and the worker, which
//! reads every row, reports it at once through its `Delivering` condition, which
//! ends the steady passes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::ResourceExt;

use super::Context;
use super::validate::Validated;
use crate::api::OutboxRelay;
use crate::api::conditions::{find, types};
use crate::postgres::binding::{self, Bound};

/// A relay gets a full pass at least this many requeue intervals apart.
pub const FULL_EVERY: u32 = 10;

/// When each relay last had a full pass that bound its objects. Kept in memory
/// only: a restarted operator starts every relay with a full pass.
#[derive(Default)]
pub struct FullPasses {
    last: Mutex<HashMap<String, Instant>>,
}

impl FullPasses {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Plain timestamps: a panic elsewhere cannot leave them inconsistent.
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bound(&self, uid: &str) {
        self.map().insert(uid.to_string(), Instant::now());
    }

    /// The next pass of `uid` is a full one.
    pub fn forget(&self, uid: &str) {
        self.map().remove(uid);
    }

    fn age(&self, uid: &str) -> Option<Duration> {
        self.map().get(uid).map(Instant::elapsed)
    }
}

/// Whether `relay` may be confirmed from a snapshot, from what it says of itself:
/// a replication relay on a table, without a partition manager (which needs its own
/// statements each pass); its database side healthy at the current generation; its
/// worker not reporting trouble; and a full pass within `full_every`.
pub fn eligible(relay: &OutboxRelay, since_full: Option<Duration>, full_every: Duration) -> bool {
    let spec = &relay.spec;
    if spec.polling.is_some() || spec.outbox.messages.is_some() || spec.outbox.partitions.is_some() {
        return false;
    }
    if since_full.is_none_or(|age| age >= full_every) {
        return false;
    }
    let conditions = relay
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let database_ready = find(conditions, types::DATABASE_READY)
        .is_some_and(|c| c.status == "True" && c.observed_generation == relay.metadata.generation);
    let worker_troubled = find(conditions, types::DELIVERING).is_some_and(|c| c.status == "False");
    database_ready && !worker_troubled
}

/// The steady pass: `Some` when the snapshot confirms the relay's objects as they
/// are; `None` sends the reconcile through the full pass. A snapshot that cannot be
/// read also gives `None`: the full pass then reports what is wrong.
pub async fn confirm(relay: &OutboxRelay, ctx: &Context, v: &Validated) -> Option<Bound> {
    let interval = ctx.config.requeue_interval;
    let uid = relay.uid().unwrap_or_default();
    if !eligible(relay, ctx.full_passes.age(&uid), interval * FULL_EVERY) {
        return None;
    }
    let target = &v.database;
    let (snapshot, read) = ctx
        .pg_snapshots
        .get(
            &ctx.pg_pool,
            &target.connect,
            interval,
            crate::postgres::CONNECT_TIMEOUT + Duration::from_secs(20),
        )
        .await
        .ok()?;
    if read {
        ctx.metrics.database_snapshot();
    }
    let owner = super::apply::owner_of(relay);
    // No owner counts as gone here: a record of anyone else's is left to the full
    // pass, which asks the API server.
    let intent = super::apply::remembered(relay, &target.slot);
    binding::confirm(&target.binding(&owner), &snapshot, &intent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn condition(type_: &str, status: &str, generation: i64) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: Some(generation),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn relay(generation: i64, conditions: Vec<Condition>) -> OutboxRelay {
        let mut r = OutboxRelay::test();
        r.metadata.generation = Some(generation);
        r.status = Some(crate::api::OutboxRelayStatus {
            conditions,
            ..Default::default()
        });
        r
    }

    const EVERY: Duration = Duration::from_secs(300);
    const RECENT: Option<Duration> = Some(Duration::from_secs(30));

    #[test]
    fn a_healthy_relay_with_a_recent_full_pass_is_confirmed() {
        let r = relay(3, vec![condition(types::DATABASE_READY, "True", 3)]);
        assert!(eligible(&r, RECENT, EVERY));
        let delivering = relay(
            3,
            vec![
                condition(types::DATABASE_READY, "True", 3),
                condition(types::DELIVERING, "True", 3),
            ],
        );
        assert!(eligible(&delivering, RECENT, EVERY));
    }

    #[test]
    fn anything_else_gets_a_full_pass() {
        let healthy = vec![condition(types::DATABASE_READY, "True", 3)];
        // No full pass yet (a restarted operator), or too long ago.
        assert!(!eligible(&relay(3, healthy.clone()), None, EVERY));
        assert!(!eligible(&relay(3, healthy.clone()), Some(EVERY), EVERY));
        // The spec changed since the database side was last checked.
        assert!(!eligible(&relay(4, healthy.clone()), RECENT, EVERY));
        // The database side is not healthy, or was never reported.
        assert!(!eligible(
            &relay(3, vec![condition(types::DATABASE_READY, "False", 3)]),
            RECENT,
            EVERY
        ));
        assert!(!eligible(&relay(3, vec![]), RECENT, EVERY));
        // The worker reports trouble (a missing slot, a column it cannot read).
        let troubled = relay(
            3,
            vec![
                condition(types::DATABASE_READY, "True", 3),
                condition(types::DELIVERING, "False", 3),
            ],
        );
        assert!(!eligible(&troubled, RECENT, EVERY));
    }

    #[test]
    fn relays_that_need_statements_of_their_own_always_get_a_full_pass() {
        let healthy = vec![condition(types::DATABASE_READY, "True", 3)];
        let mut polling = relay(3, healthy.clone());
        polling.spec.polling =
            Some(serde_json::from_value(serde_json::json!({"orderColumn": "seq"})).expect("a polling spec"));
        assert!(!eligible(&polling, RECENT, EVERY));
        let mut partitioned = relay(3, healthy);
        partitioned.spec.outbox.partitions = Some(
            serde_json::from_value(serde_json::json!({"column": "created_at", "interval": "Daily", "retention": "7d"}))
                .expect("a partitions spec"),
        );
        assert!(!eligible(&partitioned, RECENT, EVERY));
    }
}
