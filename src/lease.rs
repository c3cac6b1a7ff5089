//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one reconciles while the others stand by.
//!
//! Why our own: the maintained crates (`kube-leader-election`, `kubert`'s lease)
//! are built against older kube-rs majors, which would pull a second copy of the
//! whole client stack into the build; kube-runtime has no elector. The protocol is
//! small and follows client-go's:
//!
//! - Every write is a `replace` carrying the `resourceVersion` that was read, so two
//!   candidates racing for the same Lease cannot both win: the API server accepts
//!   one and answers the other with a conflict.
//! - A follower never trusts the holder's `renewTime` (clocks differ): it takes over
//!   only after the Lease object has not changed for the holder's
//!   `leaseDurationSeconds`, measured on its own monotonic clock.
//! - The leader renews every [`Timings::retry`]; if it has not renewed within
//!   [`Timings::renew_deadline`] (shorter than the lease duration) it stops leading
//!   before anyone can take over. On a clean shutdown it releases the Lease, so the
//!   hand-over does not wait for the duration.
//!
//! [`decide`] is the pure core; [`Elector`] does the I/O.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Error as KubeError};
use tokio::sync::watch;
use tracing::{info, warn};

/// How long a lease lasts and how often it is renewed or retried.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// What the holder promises: nobody takes over before this much silence.
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long.
    pub renew_deadline: Duration,
    /// Between two renewals, and between two attempts of a follower.
    pub retry: Duration,
}

impl Default for Timings {
    /// client-go's defaults.
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// Errors of the elector. `category()` is stable (logs, metric labels).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading or writing Lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: Box<KubeError>,
    },
    #[error("lost the Lease {name}: not renewed for {deadline:?}")]
    Lost { name: String, deadline: Duration },
}

impl LeaseError {
    pub fn category(&self) -> &'static str {
        match self {
            LeaseError::Api { .. } => "LeaseApiError",
            LeaseError::Lost { .. } => "LeaseLost",
        }
    }
}

/// What a candidate should do with the Lease as it was read.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder let it expire: write ourselves in.
    Acquire,
    /// We hold it: write a new renew time.
    Renew,
    /// Someone else holds it and may still be alive.
    Follow { holder: String },
}

/// The pure core. `unchanged_for` is how long (on our clock) the Lease object has
/// stayed the same; `duration` is the holder's declared lease duration.
pub fn decide(me: &str, holder: Option<&str>, unchanged_for: Duration, duration: Duration) -> Decision {
    match holder {
        None | Some("") => Decision::Acquire,
        Some(h) if h == me => Decision::Renew,
        // Expired: the holder stopped renewing (crashed, partitioned, killed).
        Some(_) if unchanged_for >= duration => Decision::Acquire,
        Some(h) => Decision::Follow { holder: h.to_string() },
    }
}

/// Who leads, as the HTTP probes and logs see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Candidate,
    Follower { leader: String },
    Leader,
}

/// One candidate for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    role: watch::Sender<Role>,
    /// The resourceVersion last seen and when it was first seen.
    seen: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timings: Timings) -> Self {
        let (role, _) = watch::channel(Role::Candidate);
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            role,
            seen: None,
        }
    }

    /// Follows the current role (for readiness and logs).
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Returns once this candidate leads. API errors are retried: a follower that
    /// cannot reach the API server simply does not lead.
    pub async fn acquire(&mut self) {
        loop {
            // Bounded: the client's own timeouts are sized for watches.
            match tokio::time::timeout(self.timings.renew_deadline, self.try_once())
                .await
                .unwrap_or(Ok(false))
            {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    self.role.send_replace(Role::Leader);
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, category = e.category(), "leader election attempt failed"),
            }
            tokio::time::sleep(self.timings.retry).await;
        }
    }

    /// Renews while leading; returns (with [`LeaseError::Lost`]) only when the
    /// lease could not be renewed within the deadline or someone else holds it.
    pub async fn keep_leading(&mut self) -> LeaseError {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timings.retry).await;
            let taken = match tokio::time::timeout(self.timings.retry, self.try_once()).await {
                Ok(Ok(true)) => {
                    renewed = Instant::now();
                    false
                }
                // Someone else's name is in the Lease: we are not the leader.
                Ok(Ok(false)) => true,
                Ok(Err(e)) => {
                    warn!(error = %e, category = e.category(), "renewing the lease failed");
                    false
                }
                Err(_) => {
                    warn!("renewing the lease timed out");
                    false
                }
            };
            if taken || renewed.elapsed() >= self.timings.renew_deadline {
                self.role.send_replace(Role::Candidate);
                return LeaseError::Lost {
                    name: self.name.clone(),
                    deadline: self.timings.renew_deadline,
                };
            }
        }
    }

    /// Gives the Lease up (clean shutdown), so a follower takes over at its next
    /// attempt instead of after the lease duration.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        // No holder: a follower acquires it at its next attempt.
        spec.holder_identity = None;
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => info!(lease = %self.name, "released the lease"),
            Err(e) => warn!(error = %e, "releasing the lease failed; a follower takes over after its duration"),
        }
        self.role.send_replace(Role::Candidate);
    }

    /// One read and at most one write. `Ok(true)`: we hold the Lease now.
    async fn try_once(&mut self) -> Result<bool, LeaseError> {
        let api_err = |name: &str| {
            let name = name.to_string();
            move |source| LeaseError::Api {
                name,
                source: Box::new(source),
            }
        };
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(api_err(&self.name))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(KubeError::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(api_err(&self.name)(e)),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let first_seen = match &self.seen {
            Some((v, at)) if *v == version => *at,
            _ => {
                let at = Instant::now();
                self.seen = Some((version, at));
                at
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let duration = Duration::from_secs(
            spec.lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(self.timings.lease_duration.as_secs()),
        );
        let decision = decide(
            &self.identity,
            spec.holder_identity.as_deref(),
            first_seen.elapsed(),
            duration,
        );
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = match &decision {
            Decision::Follow { holder } => {
                if *self.role.borrow() != (Role::Follower { leader: holder.clone() }) {
                    info!(lease = %self.name, leader = %holder, "following");
                    self.role.send_replace(Role::Follower { leader: holder.clone() });
                }
                return Ok(false);
            }
            Decision::Renew => self.spec(now, spec.acquire_time.clone(), transitions),
            Decision::Acquire => self.spec(now, None, transitions + 1),
        };
        lease.spec = Some(new_spec);
        // The resourceVersion read above goes with the write: a concurrent writer
        // makes this one fail with a conflict instead of both believing they lead.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                self.seen = written.metadata.resource_version.map(|v| (v, Instant::now()));
                Ok(true)
            }
            Err(KubeError::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(api_err(&self.name)(e)),
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.timings.lease_duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_free_lease_is_acquired() {
        assert_eq!(decide("a", None, Duration::ZERO, D), Decision::Acquire);
        assert_eq!(decide("a", Some(""), Duration::ZERO, D), Decision::Acquire);
    }

    #[test]
    fn the_holder_renews() {
        assert_eq!(decide("a", Some("a"), Duration::from_secs(100), D), Decision::Renew);
    }

    #[test]
    fn a_live_holder_is_followed_until_its_lease_expires_on_our_clock() {
        assert_eq!(
            decide("b", Some("a"), Duration::from_secs(14), D),
            Decision::Follow { holder: "a".into() }
        );
        assert_eq!(decide("b", Some("a"), D, D), Decision::Acquire);
    }

    #[test]
    fn the_leader_steps_down_before_anyone_may_take_over() {
        let t = Timings::default();
        assert!(t.renew_deadline < t.lease_duration);
        assert!(t.retry * 2 < t.renew_deadline);
    }

    #[test]
    fn categories_are_stable() {
        let lost = LeaseError::Lost {
            name: "x".into(),
            deadline: D,
        };
        assert_eq!(lost.category(), "LeaseLost");
        assert!(lost.to_string().contains("not renewed"));
    }
}
