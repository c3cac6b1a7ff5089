//! What the worker is doing, for `/readyz`, logs and metrics.

use std::sync::Mutex;

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
            if phase == Phase::Streaming {
                i.last_error = None;
            }
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

    pub fn last_error(&self) -> Option<(&'static str, String)> {
        self.with(|i| i.last_error.clone())
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
}
