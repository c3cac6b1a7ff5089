//! The reconciler's error: one variant per step, each with a stable category used
//! as condition reason, Event reason and metric label.

use kube::runtime::finalizer;

use super::{ApiFailure, apply, cleanup, dereference, validate};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dereference(#[from] dereference::Error),

    #[error(transparent)]
    Validate(#[from] validate::Error),

    #[error(transparent)]
    Apply(#[from] apply::Error),

    #[error("cannot write the status: {0}")]
    Status(#[source] ApiFailure),

    #[error(transparent)]
    Cleanup(#[from] cleanup::Error),

    /// Adding or removing the finalizer failed, or a step failed inside it.
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),

    #[error("cannot remove the finalizer after cleanup: {0}")]
    RemoveFinalizer(#[source] ApiFailure),

    /// A deletion is draining; only returned where a pass must fail to keep the finalizer.
    #[error("the deletion is still draining the slot")]
    Draining,
}

impl Error {
    /// Stable CamelCase category: condition reason, Event reason, metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Dereference(e) => e.category(),
            Error::Validate(e) => e.category(),
            Error::Apply(e) => e.category(),
            Error::Status(_) => "StatusWriteFailed",
            Error::Cleanup(e) => e.category(),
            Error::RemoveFinalizer(_) => "FinalizerUpdateFailed",
            Error::Draining => crate::api::conditions::reasons::DRAINING,
            Error::Finalizer(f) => match &**f {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.category(),
                finalizer::Error::AddFinalizer(_) | finalizer::Error::RemoveFinalizer(_) => "FinalizerUpdateFailed",
                finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer => "InvalidSpec",
            },
        }
    }

    /// The message without the finalizer helper's "failed to apply object:" prefix,
    /// for Events and conditions that users read.
    pub fn user_message(&self) -> String {
        match self {
            Error::Finalizer(f) => match &**f {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.user_message(),
                other => other.to_string(),
            },
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_pass_through_the_finalizer() {
        let inner = Error::Validate(validate::Error::InvalidSpec("bad".into()));
        assert_eq!(inner.category(), "InvalidSpec");
        let wrapped = Error::Finalizer(Box::new(finalizer::Error::ApplyFailed(inner)));
        assert_eq!(wrapped.category(), "InvalidSpec");
        assert_eq!(wrapped.user_message(), "bad");
        let pg = Error::Apply(apply::Error::Database(crate::postgres::PgError::TableNotFound {
            table: "public.outbox".into(),
        }));
        assert_eq!(pg.category(), "TableNotFound");
    }
}
