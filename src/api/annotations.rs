//! Annotations users set on an `OutboxRelay` to ask for an action the spec cannot
//! express. Each action is explicit and idempotent, so a GitOps tool can hold the
//! annotation in Git: the operator acts once per value and echoes the value it acted
//! on in the status.

/// Asks for a new replication slot after the old one was lost (`SlotLost`,
/// `DatabaseChanged`). Any new value (a date, a ticket number) triggers it once; the
/// value is echoed in `status.binding.recreatedFor`. Events between the lost slot's
/// last confirmed position and the new slot's start are not relayed: the status
/// message and a Warning Event name that range.
pub const RECREATE_SLOT: &str = "outbox.dev/recreate-slot";

/// `"true"` ends a deletion drain at once: the slot is dropped even though events
/// written before the delete were not relayed, and a Warning Event says which.
pub const FORCE_DELETE: &str = "outbox.dev/force-delete";

/// `"true"` lets the relay take over a slot or publication that exists but that no
/// existing relay owns (created by hand, by another tool, or kept by a relay deleted
/// with `cleanupPolicy: Retain`). Objects owned by a relay that still exists are never
/// taken over.
pub const ADOPT: &str = "outbox.dev/adopt";

/// The value of `key` in the object's annotations.
pub fn get<'a>(meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Whether `key` is set to `"true"`.
pub fn is_true(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
    get(meta, key).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}
