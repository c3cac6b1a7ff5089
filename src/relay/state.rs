//! What the worker is doing, for `/readyz`, logs and metrics.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::core::EventRef;

/// Worker phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting or not yet streaming.
    Starting,
    /// Another worker holds the slot; this one takes over when it goes away.
    Standby,
    /// Streaming from the slot and delivering.
    Streaming,
    /// The last session failed; retrying with backoff.
    Failing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "Starting",
            Phase::Standby => "Standby",
            Phase::Streaming => "Streaming",
            Phase::Failing => "Failing",
        }
    }
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Category and message of the last error, cleared when streaming resumes cleanly.
    last_error: Option<(&'static str, String)>,
    /// Events in flight and Kafka silent for too long.
    stalled: Option<String>,
    /// When the streaming session last heard from the server (or was not
    /// listening on purpose, paused for Kafka). Set by the session's loop, so a
    /// loop stuck anywhere lets it age too.
    heard_at: Instant,
    /// The event parked on a skip request, once it was.
    skipped: Option<EventRef>,
    /// See [`RelayState::liveness`].
    liveness_bound: Duration,
}

/// Shared between the relay loop and the HTTP handlers.
#[derive(Debug)]
pub struct RelayState {
    inner: Mutex<Inner>,
}

impl Default for RelayState {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                phase: Phase::Starting,
                last_error: None,
                stalled: None,
                heard_at: Instant::now(),
                skipped: None,
                liveness_bound: Duration::from_secs(60),
            }),
        }
    }
}

impl RelayState {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A poisoned lock only means a panic elsewhere; the data is still usable.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn phase(&self) -> Phase {
        self.with(|i| i.phase)
    }

    pub fn set_phase(&self, phase: Phase) {
        self.with(|i| {
            i.phase = phase;
            i.heard_at = Instant::now();
            // A new session starting to stream is not yet proof the last error is
            // gone (a relay stopped at a poison event streams again for a moment on
            // every retry): `progressed` clears it.
        });
    }

    /// The session moved the confirmed position: whatever failed before is past.
    pub fn progressed(&self) {
        self.with(|i| {
            i.last_error = None;
        });
    }

    pub fn set_error(&self, category: &'static str, message: String) {
        self.with(|i| {
            i.phase = Phase::Failing;
            i.last_error = Some((category, message));
        });
    }

    pub fn set_stalled(&self, why: Option<String>) {
        self.with(|i| i.stalled = why);
    }

    pub fn stalled(&self) -> Option<String> {
        self.with(|i| i.stalled.clone())
    }

    /// Updated by the session (about every 100 ms) while it streams.
    pub fn heard(&self, at: Instant) {
        self.with(|i| i.heard_at = at);
    }

    pub fn set_liveness_bound(&self, bound: Duration) {
        self.with(|i| i.liveness_bound = bound);
    }

    pub fn set_skipped(&self, event: EventRef) {
        self.with(|i| i.skipped = Some(event));
    }

    pub fn skipped(&self) -> Option<EventRef> {
        self.with(|i| i.skipped.clone())
    }

    /// For `/healthz`: fails when a streaming session heard nothing from the
    /// server for longer than `bound`, i.e. it is stuck in a way its own reply
    /// deadline did not catch; restarting the process is then the way out.
    /// Failing sessions are not unhealthy: the supervisor retries them, and a
    /// restart would only lose the backoff.
    pub fn liveness(&self) -> Result<(), String> {
        self.with(|i| {
            let silent = i.heard_at.elapsed();
            match i.phase {
                Phase::Streaming if silent > i.liveness_bound => Err(format!(
                    "streaming but nothing heard from PostgreSQL for {}s (bound {}s)",
                    silent.as_secs(),
                    i.liveness_bound.as_secs()
                )),
                _ => Ok(()),
            }
        })
    }

    pub fn last_error(&self) -> Option<(&'static str, String)> {
        self.with(|i| i.last_error.clone())
    }

    /// Whether the last failure is still unresolved.
    pub fn failing(&self) -> bool {
        self.with(|i| i.last_error.is_some())
    }

    /// `Ok(phase)` when the worker is healthy (streaming, or a standby ready to
    /// take over); `Err(reason)` otherwise.
    pub fn readiness(&self) -> Result<&'static str, String> {
        self.with(|i| match (&i.phase, &i.stalled, &i.last_error) {
            (Phase::Streaming, Some(why), _) => Err(format!("stalled: {why}")),
            (Phase::Streaming | Phase::Standby, _, _) => Ok(i.phase.as_str()),
            (Phase::Failing, _, Some((cat, msg))) => Err(format!("{cat}: {msg}")),
            (p, _, _) => Err(p.as_str().to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_phase_and_stall() {
        let s = RelayState::default();
        assert!(s.readiness().is_err());
        s.set_phase(Phase::Streaming);
        assert_eq!(s.readiness(), Ok("Streaming"));
        s.set_stalled(Some("kafka silent for 20s".into()));
        assert!(s.readiness().unwrap_err().contains("kafka silent"));
        s.set_stalled(None);
        s.set_error("UnknownTopic", "topic x does not exist".into());
        assert_eq!(s.readiness().unwrap_err(), "UnknownTopic: topic x does not exist");
        s.set_phase(Phase::Standby);
        assert_eq!(s.readiness(), Ok("Standby"));
    }

    #[test]
    fn only_progress_clears_the_last_error() {
        let s = RelayState::default();
        s.set_error("MessageTooLarge", "event e@0/1 ...".into());
        s.set_phase(Phase::Streaming);
        assert!(s.failing(), "a retry that streams again has not fixed anything yet");
        s.progressed();
        assert!(!s.failing());
        assert_eq!(s.last_error(), None);
    }

    #[test]
    fn liveness_fails_only_for_a_silent_streaming_session() {
        let ago = |secs| Instant::now().checked_sub(Duration::from_secs(secs)).expect("clock");
        let s = RelayState::default();
        s.set_liveness_bound(Duration::from_secs(60));
        s.heard(ago(600));
        assert!(s.liveness().is_ok(), "starting: not streaming yet");
        s.set_phase(Phase::Streaming);
        assert!(s.liveness().is_ok(), "a new session starts silent-free");
        s.heard(ago(30));
        assert!(s.liveness().is_ok());
        s.heard(ago(61));
        assert!(s.liveness().unwrap_err().contains("nothing heard"));
        s.set_error("ReplicationTimeout", "silent".into());
        assert!(s.liveness().is_ok(), "the supervisor retries failing sessions");
    }
}
