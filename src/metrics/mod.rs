//! Prometheus metrics (OpenMetrics text) of the relay worker and of the operator.
//!
//! Names follow `outbox_<component>_<what>_<unit>`. Labels stay low-cardinality:
//! outcomes and error categories only; never event ids, topics or LSNs. The
//! relay a series belongs to comes from the scrape target's pod labels.

mod operator;
mod relay;

use prometheus_client::encoding::EncodeLabelSet;

pub use operator::*;
pub use relay::*;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Stable error category (`MessageTooLarge`, `DatabaseUnreachable`, ...).
    pub kind: &'static str,
}
