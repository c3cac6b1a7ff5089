//! Idle SQL connections of the operator, kept between reconciles.
//!
//! Every reconcile of every relay talks to its database, every requeue interval.
//! Opening a connection each time costs a TCP handshake, often TLS, and SCRAM
//! authentication (thousands of PBKDF2 rounds on both sides) per relay and
//! interval: most of the operator's CPU at a hundred relays, and as much again on
//! the server. So a reconcile takes an idle connection to the same server,
//! database and role when one is there, and hands it back only when it finished
//! cleanly.
//!
//! Exclusive use, never sharing: a step that times out is abandoned by dropping
//! its connection, which is what ends the statement on the server (see
//! `controller::apply::timed`). A [`Pooled`] connection that is dropped instead of
//! [`Pooled::release`]d is therefore closed, never reused. A reused connection is
//! checked with a short round trip first, so a server that went away costs a new
//! connection, not a reconcile.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{PgConnectConfig, PgError, connect};

/// How long an idle connection is kept: longer than the default requeue interval
/// (30 s), so a steady operator reuses it, short enough that a relay that went
/// away does not hold a server connection for long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per server, database and role. Reconciles of one
/// database's relays still overlap (a status write triggers another reconcile at
/// once); a burst beyond this opens connections that close afterwards. Measured
/// at 100 relays in 10 databases (`benches/operator_scale.rs`): with 2 kept, 0.35–0.6
/// new sessions per reconcile; with 4, 0.03, for 40 idle sessions on the server.
pub const MAX_IDLE_PER_KEY: usize = 4;
/// The round trip that checks a reused connection.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The operator's sessions in `pg_stat_activity`. One name for all of them: a
/// connection serves every relay of its database in turn.
pub const APPLICATION_NAME: &str = "outbox-operator";

struct Idle {
    client: Client,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    idle: HashMap<PgConnectConfig, Vec<Idle>>,
}

/// The operator's idle connections. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Pool {
    inner: Arc<Mutex<Inner>>,
}

impl Pool {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain collections: a panic elsewhere cannot leave them inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key a connection is kept under: everything that decides where and as
    /// whom it connects, and the operator's application name.
    pub(crate) fn key(cfg: &PgConnectConfig) -> PgConnectConfig {
        let mut key = cfg.clone();
        key.application_name = APPLICATION_NAME.to_owned();
        key
    }

    /// An idle connection for `cfg` that answered a round trip, else a new one.
    pub async fn get(&self, cfg: &PgConnectConfig) -> Result<Pooled, PgError> {
        let key = Self::key(cfg);
        while let Some(client) = self.take_idle(&key, Instant::now()) {
            let alive = matches!(
                tokio::time::timeout(CHECK_TIMEOUT, client.simple_query("")).await,
                Ok(Ok(_))
            );
            if alive {
                return Ok(self.pooled(key, client, true));
            }
        }
        let client = connect(&key).await?;
        Ok(self.pooled(key, client, false))
    }

    fn pooled(&self, key: PgConnectConfig, client: Client, reused: bool) -> Pooled {
        Pooled {
            client: Some(client),
            key: Some(key),
            pool: self.clone(),
            reused,
        }
    }

    /// The most recently used idle connection of `key` that has not expired;
    /// drops the expired ones of every key on the way.
    fn take_idle(&self, key: &PgConnectConfig, now: Instant) -> Option<Client> {
        let mut inner = self.lock();
        inner.idle.retain(|_, list| {
            list.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT && !i.client.is_closed());
            !list.is_empty()
        });
        inner.idle.get_mut(key).and_then(Vec::pop).map(|i| i.client)
    }

    fn put_back(&self, key: PgConnectConfig, client: Client, now: Instant) {
        if client.is_closed() {
            return;
        }
        let mut inner = self.lock();
        let list = inner.idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle { client, since: now });
        }
    }

    /// Idle connections held now, over every key.
    pub fn idle(&self) -> usize {
        self.lock().idle.values().map(Vec::len).sum()
    }
}

/// A connection taken from the [`Pool`]: dropped, it is closed; released, it is
/// kept for the next reconcile.
pub struct Pooled {
    client: Option<Client>,
    key: Option<PgConnectConfig>,
    pool: Pool,
    /// Whether it came from the pool rather than a new connection.
    pub reused: bool,
}

impl Pooled {
    /// Hands the connection back for reuse. Only after every statement on it
    /// finished: a connection abandoned mid-statement must be dropped instead.
    pub fn release(mut self) {
        if let (Some(client), Some(key)) = (self.client.take(), self.key.take()) {
            self.pool.put_back(key, client, Instant::now());
        }
    }
}

impl Deref for Pooled {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a Pooled connection holds its client until released")
    }
}
