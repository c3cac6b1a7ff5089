//! The operator: reconciles each `OutboxRelay` into a worker Deployment plus a
//! publication and a logical replication slot in PostgreSQL, and reports what it
//! found in the resource's status.
//!
//! A reconcile is a thin wrapper around [`finalizer`] that dispatches to two paths:
//! - **apply**, in steps with one module and one error type each:
//!   [`dereference`] reads the Secrets the spec points at (needs the client);
//!   [`validate`] turns spec and Secrets into a [`validate::Validated`] relay (pure);
//!   [`build`] renders the worker Deployment (pure, cannot fail);
//!   [`apply`] server-side applies the Deployment and provisions PostgreSQL;
//!   [`status`] computes the wanted status (pure) and writes it only when it changed.
//! - **cleanup** ([`cleanup`]): with `cleanupPolicy: Delete`, drains the slot
//!   ([`drain`]) and then drops the slot and the publication before the finalizer
//!   goes. The Deployment is not the finalizer's business: its owner reference lets
//!   the garbage collector remove it.
//!
//! Before anything touches PostgreSQL, [`conflicts`] checks the cache for another
//! relay naming the same slot or publication; in PostgreSQL,
//! [`crate::postgres::binding`] checks ownership records and the slot's identity.
//! [`secrets`] keeps the Secrets cleanup needs until it ran.
//!
//! Events ([`events`]) go out when a condition flips and when a reconcile fails,
//! with the error's category as the reason.

pub mod apply;
pub mod build;
pub mod cleanup;
mod conflicts;
pub mod dereference;
pub mod drain;
mod error;
pub mod events;
mod problems;
pub mod scope;
pub use scope::WatchScope;
pub mod secrets;
pub mod status;
mod steady;
mod triggers;
pub mod validate;
pub mod worker_rbac;

#[cfg(test)]
pub(crate) mod fixture;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, instrument, warn};

pub use error::Error;

use crate::api::OutboxRelay;
use crate::http::Probe;
use crate::metrics::OperatorMetrics;

/// Finalizer that guards the slot and publication (state outside Kubernetes).
pub const FINALIZER: &str = "outbox.dev/cleanup";
/// Field manager of every server-side apply, and the Events' reporting controller.
pub const FIELD_MANAGER: &str = "outbox-operator";
/// Label selector of the Deployments this operator renders.
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=outbox-operator";

/// Upper bound of one Kubernetes API call. The client's own timeouts are minutes
/// long (sized for watches); a reconcile should fail and back off much sooner.
pub const API_TIMEOUT: Duration = Duration::from_secs(20);

/// Steady-state requeue: how often a healthy relay's slot lag is refreshed.
pub const DEFAULT_REQUEUE: Duration = Duration::from_secs(30);

/// First and largest wait after a failed reconcile (doubling in between).
const MIN_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(120);

/// What the operator is told at start-up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Worker image used when `spec.worker.image` is not set.
    pub relay_image: String,
    /// The namespaces to watch, or the whole cluster.
    pub scope: WatchScope,
    /// Requeue of a reconcile that succeeded (refreshes lag and conditions).
    pub requeue_interval: Duration,
}

impl Config {
    pub fn new(relay_image: impl Into<String>) -> Self {
        Self {
            relay_image: relay_image.into(),
            scope: WatchScope::cluster(),
            requeue_interval: DEFAULT_REQUEUE,
        }
    }
}

/// The running operator's shared parts, for the HTTP endpoints and for tests.
#[derive(Clone, Default)]
pub struct OperatorHandle {
    pub metrics: OperatorMetrics,
    ready: Arc<AtomicBool>,
}

impl OperatorHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the initial list of `OutboxRelay`s has been read.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

impl Probe for OperatorHandle {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn readiness(&self) -> Result<String, String> {
        if self.is_ready() {
            Ok("watching".into())
        } else {
            Err("the initial list of OutboxRelays has not been read yet".into())
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: OperatorMetrics,
    pub recorder: Recorder,
    /// Every relay the operator watches: for collisions and shared Secrets.
    pub relays: Store<OutboxRelay>,
    /// SQL connections kept between reconciles.
    pub pg_pool: crate::postgres::pool::Pool,
    /// Shared reads of each database's slots and publications (`steady`).
    pub pg_snapshots: crate::postgres::snapshot::Snapshots,
    /// When each relay last had a full database pass (`steady`).
    full_passes: steady::FullPasses,
    /// Consecutive failed reconciles per relay, for the backoff.
    failures: Mutex<HashMap<ObjectRef<OutboxRelay>, u32>>,
}

impl Context {
    pub fn new(client: Client, config: Config, metrics: OperatorMetrics, relays: Store<OutboxRelay>) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER));
        Self {
            client,
            config,
            metrics,
            recorder,
            relays,
            pg_pool: Default::default(),
            pg_snapshots: Default::default(),
            full_passes: Default::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<OutboxRelay>, u32>> {
        // The map holds plain counters: a panic elsewhere cannot leave it inconsistent.
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_failure(&self, relay: &OutboxRelay) -> u32 {
        let mut map = self.failures();
        let n = map.entry(ObjectRef::from_obj(relay)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn reset_failures(&self, relay: &OutboxRelay) {
        self.failures().remove(&ObjectRef::from_obj(relay));
    }
}

/// Runs the controller until `shutdown` resolves, then lets running reconciles finish.
pub async fn run(
    client: Client,
    config: Config,
    handle: OperatorHandle,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // One watch per namespace in a namespaced install (it may not list across the
    // cluster), merged into one relay store; see [`scope`].
    let writer = Writer::<OutboxRelay>::default();
    let store = writer.as_reader();
    let relays = scope::relay_triggers(
        config.scope.apis(&client),
        watcher::Config::default().any_semantic(),
        writer,
    );
    // Metadata only: ownership needs the owner references, nothing else.
    let deployments = scope::metadata_triggers(
        config.scope.apis::<PartialObjectMeta<Deployment>>(&client),
        watcher::Config::default().labels(MANAGED_BY_SELECTOR),
    );
    // Metadata only: the API server sends no Secret data on this watch.
    let secrets = scope::metadata_triggers(
        config.scope.apis::<PartialObjectMeta<Secret>>(&client),
        watcher::Config::default().any_semantic(),
    );
    // Not on the operator's own status writes (see `triggers`).
    let relays = relays.predicate_filter(triggers::relevant, PredicateConfig::default());
    let controller = Controller::for_stream(relays, store.clone());

    let ready = handle.ready.clone();
    let synced = store.clone();
    tokio::spawn(async move {
        // Polled with a timeout in a loop: the controller waits on the same store, and
        // the store wakes only the most recent waiter, so a single await could sleep forever.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), synced.wait_until_ready()).await {
                Ok(Ok(())) => {
                    ready.store(true, Ordering::Relaxed);
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });

    let ctx = Arc::new(Context::new(client, config, handle.metrics.clone(), store.clone()));
    info!(scope = %ctx.config.scope, "operator started");
    controller
        .owns_stream(deployments)
        // A changed Secret must reach the relays that use it: credentials in the
        // pod template hash roll the workers, and provisioning retries at once.
        // Metadata only: the watch needs to know that a Secret changed, never what it
        // holds. Its data is read (one GET) only when reconciling a relay that names it,
        // so the operator never holds other teams' credentials, and its memory does not
        // grow with the size of every Secret in the cluster.
        .watches_stream(secrets, move |secret: PartialObjectMeta<Secret>| {
            relays_using_secret(&store, &secret.metadata)
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(relay = %obj, "reconciled"),
                // Logged with their context by error_policy already.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // A requeue that fires after the object was deleted: expected, nothing to do.
                Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => debug!(relay = %obj, "already gone"),
                // Watch trouble (RBAC, API server away): the watches retry with backoff,
                // but someone should know.
                Err(e) => warn!(error = %e, "controller"),
            }
        })
        .instrument(info_span!("controller"))
        .await;
    info!("operator stopped");
}

/// The relays in the Secret's namespace whose spec names it.
fn relays_using_secret(store: &Store<OutboxRelay>, secret: &ObjectMeta) -> Vec<ObjectRef<OutboxRelay>> {
    let (Some(ns), Some(name)) = (secret.namespace.as_deref(), secret.name.as_deref()) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(ns) && referenced_secrets(r).contains(name))
        .map(|r| ObjectRef::from_obj(&**r))
        .collect()
}

/// Names of the Secrets a relay's spec refers to.
pub fn referenced_secrets(relay: &OutboxRelay) -> BTreeSet<&str> {
    let s = &relay.spec;
    let mut out = BTreeSet::new();
    out.insert(s.database.credentials_secret_ref.name.as_str());
    if let Some(r) = &s.database.tls.ca_secret_ref {
        out.insert(r.name.as_str());
    }
    if let Some(r) = &s.kafka.security.credentials_secret_ref {
        out.insert(r.name.as_str());
    }
    if let Some(r) = &s.kafka.security.ca_secret_ref {
        out.insert(r.name.as_str());
    }
    out
}

#[instrument(skip(obj, ctx), fields(namespace = %obj.namespace().unwrap_or_default(), name = %obj.name_any()))]
async fn reconcile(obj: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);
    let result = if obj.meta().deletion_timestamp.is_some() {
        // Deletion is handled here rather than by the finalizer helper, which would
        // take the finalizer off after any successful pass: a drain needs passes
        // that succeed and still keep it.
        delete(&api, &obj, &ctx).await
    } else {
        let step_ctx = ctx.clone();
        finalizer(&api, FINALIZER, obj.clone(), |event| async move {
            match event {
                finalizer::Event::Apply(relay) => reconcile_apply(&relay, &step_ctx).await,
                // Not reached (deleted objects take the branch above); kept safe anyway.
                finalizer::Event::Cleanup(relay) => match cleanup::run(&relay, &step_ctx).await? {
                    cleanup::Progress::Done => Ok(Action::await_change()),
                    cleanup::Progress::Wait(_) => Err(Error::Draining),
                },
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    };

    match &result {
        Ok(_) => ctx.reset_failures(&obj),
        Err(e) => {
            ctx.metrics.reconcile_error(e.category());
            let action = if obj.meta().deletion_timestamp.is_some() {
                "Cleanup"
            } else {
                "Reconcile"
            };
            events::error(&ctx.recorder, &obj, action, e).await;
        }
    }
    result
}

/// A cleanup pass of a relay being deleted; the finalizer goes once it is done.
async fn delete(api: &Api<OutboxRelay>, obj: &OutboxRelay, ctx: &Context) -> Result<Action, Error> {
    let Some(index) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(Action::await_change());
    };
    match cleanup::run(obj, ctx).await? {
        cleanup::Progress::Wait(after) => Ok(Action::requeue(after)),
        cleanup::Progress::Done => {
            ctx.full_passes.forget(&obj.uid().unwrap_or_default());
            // Remove exactly our entry, and only if it is still where we saw it.
            let path = format!("/metadata/finalizers/{index}");
            let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
                {"op": "test", "path": path, "value": FINALIZER},
                {"op": "remove", "path": path},
            ]))
            .map_err(|e| Error::RemoveFinalizer(ApiFailure::Api(kube::Error::SerdeError(e))))?;
            let pp = kube::api::PatchParams::default();
            match api_call(api.patch(&obj.name_any(), &pp, &kube::api::Patch::<()>::Json(patch))).await {
                Ok(_) => Ok(Action::await_change()),
                Err(e) if e.code() == Some(404) => Ok(Action::await_change()),
                Err(e) => Err(Error::RemoveFinalizer(e)),
            }
        }
    }
}

/// Apply path: steps, status, gauges and flip events.
async fn reconcile_apply(relay: &OutboxRelay, ctx: &Context) -> Result<Action, Error> {
    let outcome = apply::observe(relay, ctx).await;
    if let Some(take) = &outcome.take {
        events::take(&ctx.recorder, relay, take).await;
    }
    let desired = status::desired_status(relay, &outcome.observed, &status::now());
    let previous = relay
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let flips = events::flips(previous, &desired.conditions);

    let write = if status::unchanged(relay.status.as_ref(), &desired) {
        Ok(false)
    } else {
        status::write(&ctx.client, relay, &desired).await.map(|()| true)
    };
    ctx.metrics.set_relay(
        &relay.namespace().unwrap_or_default(),
        &relay.name_any(),
        &status::gauges(relay, &desired, &outcome.observed),
    );
    match write {
        Ok(written) => {
            ctx.metrics.status_update(written);
            for flip in &flips {
                events::flip(&ctx.recorder, relay, flip).await;
            }
        }
        Err(e) => {
            // The step's error says more about what to fix than a failed status write.
            if outcome.error.is_none() {
                return Err(Error::Status(e));
            }
            warn!(error = %e, "status write failed");
        }
    }
    match outcome.error {
        Some(e) => Err(e),
        None => Ok(Action::requeue(spread(
            ctx.config.requeue_interval,
            relay.metadata.uid.as_deref().unwrap_or_default(),
        ))),
    }
}

/// The requeue interval moved by up to ±10 %, by a fixed amount per relay. Relays
/// applied together (a GitOps sync, an operator restart) would otherwise requeue
/// together for ever, and each of those bursts needs as many database connections
/// at once as the burst has relays per database. Fixed per relay, so each relay's
/// own refresh stays regular.
pub fn spread(interval: Duration, uid: &str) -> Duration {
    // FNV-1a: stable, and spreads the bytes of a UUID well enough for this.
    let hash = uid.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let fraction = (hash % 10_001) as f64 / 10_000.0;
    interval.mul_f64(0.9 + 0.2 * fraction)
}

fn error_policy(obj: Arc<OutboxRelay>, err: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(&obj);
    let wait = backoff(failures, jitter());
    warn!(
        namespace = %obj.namespace().unwrap_or_default(),
        name = %obj.name_any(),
        category = err.category(),
        error = %err,
        retry_in = ?wait,
        "reconcile failed"
    );
    Action::requeue(wait)
}

/// Exponential backoff from [`MIN_BACKOFF`] to [`MAX_BACKOFF`], with up to 10 %
/// jitter (`jitter` in 0..1) so relays that failed together do not retry in lockstep.
fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = MIN_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF);
    base.mul_f64(1.0 + 0.1 * jitter.clamp(0.0, 1.0))
}

/// A number in 0..1 that differs between calls; spreading retries needs no better randomness.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

/// Runs a Kubernetes API call with [`API_TIMEOUT`].
pub(crate) async fn api_call<T>(fut: impl Future<Output = Result<T, kube::Error>>) -> Result<T, ApiFailure> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiFailure::Api(e)),
        Err(_) => Err(ApiFailure::Timeout),
    }
}

/// A failed Kubernetes API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    #[error("{0}")]
    Api(#[source] kube::Error),
    #[error("no answer from the Kubernetes API within {} s", API_TIMEOUT.as_secs())]
    Timeout,
}

impl ApiFailure {
    /// The HTTP status the API server answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            ApiFailure::Api(kube::Error::Api(s)) => Some(s.code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(2, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(4, 0.0), Duration::from_secs(16));
        assert_eq!(backoff(10, 0.0), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX, 0.0), MAX_BACKOFF);
        assert_eq!(backoff(1, 1.0), Duration::from_millis(2200));
    }

    #[test]
    fn a_secret_maps_to_the_relays_in_its_namespace_that_use_it() {
        let (store, mut writer) = kube::runtime::reflector::store::<OutboxRelay>();
        let uses = OutboxRelay::test();
        let mut other_ns = OutboxRelay::test();
        other_ns.metadata.namespace = Some("elsewhere".into());
        let mut ca_only = OutboxRelay::test().with_pg_ca("pg-ca", "ca.crt");
        ca_only.metadata.name = Some("with-ca".into());
        ca_only.spec.database.credentials_secret_ref.name = "other-db".into();
        for r in [uses, other_ns, ca_only] {
            writer.apply_watcher_event(&watcher::Event::Apply(r));
        }
        let secret = |ns: &str, name: &str| Secret {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Secret::default()
        };
        let names = |refs: Vec<ObjectRef<OutboxRelay>>| {
            let mut v: Vec<String> = refs
                .into_iter()
                .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(relays_using_secret(&store, &secret("shop", "orders-db").metadata)),
            ["shop/orders"]
        );
        assert_eq!(
            names(relays_using_secret(&store, &secret("shop", "pg-ca").metadata)),
            ["shop/with-ca"]
        );
        assert!(relays_using_secret(&store, &secret("shop", "unrelated").metadata).is_empty());
    }

    #[test]
    fn referenced_secrets_cover_every_ref() {
        let r = OutboxRelay::test()
            .with_pg_ca("pg-ca", "ca.crt")
            .with_kafka_sasl("kafka-user")
            .with_kafka_ca("kafka-ca", "ca.pem");
        let names: Vec<&str> = referenced_secrets(&r).into_iter().collect();
        assert_eq!(names, ["kafka-ca", "kafka-user", "orders-db", "pg-ca"]);
        let plain = OutboxRelay::test();
        assert_eq!(
            referenced_secrets(&plain).into_iter().collect::<Vec<_>>(),
            ["orders-db"]
        );
    }

    #[test]
    fn requeues_are_spread_per_relay_within_ten_percent() {
        let interval = Duration::from_secs(30);
        let uids: Vec<String> = (0..200).map(|i| format!("0b5c7e4e-7f5e-4d43-9a51-{i:012}")).collect();
        let spread_of: Vec<Duration> = uids.iter().map(|u| spread(interval, u)).collect();
        for d in &spread_of {
            assert!(*d >= Duration::from_secs(27) && *d <= Duration::from_secs(33), "{d:?}");
        }
        // Fixed per relay.
        assert_eq!(spread(interval, &uids[7]), spread_of[7]);
        // Spread over the window: both ends of it are used.
        let early = spread_of.iter().filter(|d| **d < Duration::from_secs(29)).count();
        let late = spread_of.iter().filter(|d| **d > Duration::from_secs(31)).count();
        assert!(early > 20 && late > 20, "{early} early, {late} late of 200");
    }
}
