use std::path::PathBuf;

pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// Everything that can go wrong while finding, starting or using a server. The
/// messages are meant to be read in a failed test's output, so each names what was
/// being done and, for start failures, shows the end of the server's log.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("test bed component {component} not found: {detail}; run hack/testbed fetch")]
    Missing { component: &'static str, detail: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{server} did not start: {reason}\n--- end of {} ---\n{tail}", log.display())]
    Start {
        server: &'static str,
        reason: String,
        log: PathBuf,
        tail: String,
    },

    #[error("{context} failed ({status}):\n{output}")]
    Command {
        context: String,
        status: std::process::ExitStatus,
        output: String,
    },

    #[error("{context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("{context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    #[error("{context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },

    #[error("{0}")]
    Other(String),
}

/// Adds a context string to foreign errors, like `anyhow::Context` but typed.
pub(crate) trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TestbedError::Io {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, tokio_postgres::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TestbedError::Postgres {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, rdkafka::error::KafkaError> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TestbedError::Kafka {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, kube::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TestbedError::Kube {
            context: context(),
            source,
        })
    }
}
