//! `spec.outbox.partitions`: the operator keeps a time-partitioned outbox table
//! supplied with upcoming partitions and retires old ones whole, instead of
//! deleting rows one by one (`deleteAfterRelay`).
//!
//! The lifecycle itself is `postgres::partitions`; these are only the user's words.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Time partitions of a table partitioned `BY RANGE (column)` on a `timestamptz`
/// column. A partition is dropped only after every event in it was confirmed by the
/// relay's slot: it is first detached (no row can land in it afterwards), the WAL
/// position right after the detach is recorded on it, and it is dropped once the
/// slot's confirmed position passed that record.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionsSpec {
    /// The `timestamptz` partition key column.
    #[schemars(length(min = 1, max = 63))]
    pub column: String,
    /// How much time one partition covers (ranges are aligned to UTC).
    pub interval: PartitionInterval,
    /// How many partitions after the current one to keep ready.
    #[serde(default = "default_premake")]
    #[schemars(range(min = 1, max = 366))]
    pub premake: u32,
    /// How long a partition is kept after its range ended, e.g. `72h` or `7d`
    /// (units `m`, `h`, `d`). Rows stay at least this long; a partition is retired
    /// only once its range ended `retention` (and at least one interval) ago.
    #[schemars(regex(pattern = r"^[0-9]{1,6}[mhd]$"))]
    pub retention: String,
}

fn default_premake() -> u32 {
    3
}

/// The range one partition covers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PartitionInterval {
    Hourly,
    Daily,
}

impl PartitionInterval {
    pub fn seconds(self) -> i64 {
        match self {
            PartitionInterval::Hourly => 3_600,
            PartitionInterval::Daily => 86_400,
        }
    }
}

/// What the operator last did with the table's partitions (`status.partitions`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionsStatus {
    /// Partitions attached to the table (the current one, upcoming ones, and those
    /// still within retention).
    pub attached: u32,
    /// Partitions past retention that are not dropped yet, and why: detached ones
    /// waiting for the slot to confirm them, or ones kept because their range
    /// starts before the slot was created.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringPartition>,
    /// The last pass's failure, `<category>: <message>`; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A partition past retention that is not dropped yet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringPartition {
    /// The table, in the outbox table's schema.
    pub name: String,
    /// For a detached one: the WAL position recorded right after the detach; the
    /// table is dropped once the slot's confirmed position reached it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_at_lsn: Option<String>,
    /// Why it is still there.
    pub reason: String,
}

/// `72h`, `7d`, `90m` as seconds; `None` for anything else (the schema's pattern
/// keeps such values out of the API server).
pub fn parse_retention(text: &str) -> Option<i64> {
    let unit = match text.chars().last()? {
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => return None,
    };
    let n: u32 = text[..text.len() - 1].parse().ok()?;
    Some(i64::from(n) * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_units() {
        assert_eq!(parse_retention("90m"), Some(5_400));
        assert_eq!(parse_retention("72h"), Some(259_200));
        assert_eq!(parse_retention("7d"), Some(604_800));
        assert_eq!(parse_retention("7"), None);
        assert_eq!(parse_retention("d"), None);
        assert_eq!(parse_retention("-1h"), None);
    }
}
