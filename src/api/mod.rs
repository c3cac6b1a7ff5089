//! The `OutboxRelay` custom resource (`outbox.dev/v1alpha1`).
//!
//! Validation lives in the schema wherever the API server can check it (enums,
//! bounds, patterns, CEL rules), so a bad resource is refused at `kubectl apply`
//! time with a message that names the field, instead of surfacing later as a
//! failed reconcile.

pub mod annotations;
pub mod conditions;
pub mod names;
pub mod partitions;
pub mod polling;
pub mod reference;
pub mod source;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use polling::{PollingSpec, RelayMode};
pub use source::{MessagesSpec, OutboxSource};

/// API group of every resource this operator owns.
pub const GROUP: &str = "outbox.dev";

/// Declares one relay: which outbox table to stream from which database to which Kafka topics.
// Several `printcolumn(...)` entries share keys like `type_`; clippy reads them as
// repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    plural = "outboxrelays",
    singular = "outboxrelay",
    shortname = "obr",
    category = "outbox",
    namespaced,
    status = "OutboxRelayStatus",
    derive = "PartialEq",
    doc = "Relays rows inserted into a PostgreSQL outbox table to Kafka through logical replication.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Table", type_ = "string", json_path = ".spec.outbox.table"),
    printcolumn(name = "Topic", type_ = "string", json_path = ".status.destination"),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.slot.lagBytes",
        description = "Bytes of WAL not yet confirmed by the relay"
    ),
    printcolumn(name = "Slot", type_ = "string", json_path = ".status.slot.name", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
// Identity: the slot holds this relay's unread events, and it lives in one database for
// one table under one name. Changing any of these would leave the old slot's backlog
// behind (or confirm it away) without a word, so the API server refuses the change,
// also when an optional name is added or removed. The rules sit on the spec, a parent
// that always exists, because a rule on an optional field never runs when that field
// is added or removed.
#[x_kube(validation = Rule::new("self.database.host == oldSelf.database.host && self.database.port == oldSelf.database.port && self.database.database == oldSelf.database.database").message("spec.database (host, port, database) is immutable: the relay's slot and its unread events live in that database; create a new OutboxRelay for another database").field_path(".database"))]
#[x_kube(validation = Rule::new("has(self.outbox.table) == has(oldSelf.outbox.table) && (!has(self.outbox.table) || self.outbox.table == oldSelf.outbox.table)").message("spec.outbox.table is immutable: the relay's slot streams that table; create a new OutboxRelay for another table").field_path(".outbox.table"))]
#[x_kube(validation = Rule::new("(has(self.replication) && has(self.replication.slotName)) == (has(oldSelf.replication) && has(oldSelf.replication.slotName)) && (!(has(self.replication) && has(self.replication.slotName)) || self.replication.slotName == oldSelf.replication.slotName)").message("spec.replication.slotName is immutable, also when it is added or removed: a new slot would start at the current WAL position and skip the old slot's unread events; create a new OutboxRelay instead").field_path(".replication.slotName"))]
#[x_kube(validation = Rule::new("(has(self.replication) && has(self.replication.publicationName)) == (has(oldSelf.replication) && has(oldSelf.replication.publicationName)) && (!(has(self.replication) && has(self.replication.publicationName)) || self.replication.publicationName == oldSelf.replication.publicationName)").message("spec.replication.publicationName is immutable, also when it is added or removed: the slot decodes through it; create a new OutboxRelay instead").field_path(".replication.publicationName"))]
#[x_kube(validation = Rule::new(source::IDENTITY_RULE).message(source::IDENTITY_MESSAGE).field_path(".outbox.source"))]
#[x_kube(validation = Rule::new(source::ROUTE_RULE).message(source::ROUTE_MESSAGE).field_path(".kafka.routeBy.column"))]
#[x_kube(validation = Rule::new(polling::SETTINGS_RULE).message(polling::SETTINGS_MESSAGE).field_path(".polling"))]
#[x_kube(validation = Rule::new(polling::SOURCE_RULE).message(polling::SOURCE_MESSAGE).field_path(".mode"))]
#[x_kube(validation = Rule::new(polling::IDENTITY_RULE).message(polling::IDENTITY_MESSAGE).field_path(".mode"))]
pub struct OutboxRelaySpec {
    /// `Replication` (default): stream committed inserts from a logical replication
    /// slot. `Polling`: read and delete rows in batches, for databases without
    /// logical replication (see `polling`). Cannot change after creation.
    #[serde(default, skip_serializing_if = "is_default_mode")]
    pub mode: RelayMode,
    /// Settings of mode `Polling` (required with it, refused without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling: Option<PollingSpec>,
    /// The PostgreSQL database that holds the outbox table.
    pub database: DatabaseSpec,
    /// The outbox table and how its columns map onto Kafka records.
    pub outbox: OutboxSpec,
    /// Where the records go.
    pub kafka: KafkaSpec,
    /// Replication slot and publication (names and lag thresholds).
    #[serde(default)]
    pub replication: ReplicationSpec,
    /// What happens to events that Kafka refuses for good.
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// What happens to the slot and publication when this resource is deleted.
    /// `Delete` drops both (an orphaned slot pins WAL on the primary until its disk fills up);
    /// `Retain` keeps them, e.g. to hand the slot to another relay.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,
    /// With `cleanupPolicy: Delete`, how long deletion waits for the worker to relay every
    /// event written before the delete, before it drops the slot anyway (and says in a
    /// Warning Event which events were dropped unrelayed). The annotation
    /// `outbox.dev/force-delete: "true"` ends the wait at once.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 0, max = 604800))]
    pub drain_timeout_seconds: i64,
    /// The worker pods that run the relay.
    #[serde(default)]
    pub worker: WorkerSpec,
    /// Stops the worker (scales it to zero) while keeping the slot, so no event is lost.
    #[serde(default)]
    pub suspend: bool,
}

fn is_default_mode(m: &RelayMode) -> bool {
    *m == RelayMode::Replication
}

fn default_drain_timeout() -> i64 {
    600
}

/// Connection to PostgreSQL. Credentials always come from a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Host name or address of the primary (logical slots live on the primary).
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port.
    #[serde(default = "default_pg_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Database name.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// TLS towards PostgreSQL, with libpq's `sslmode` meaning.
    #[serde(default)]
    pub tls: PgTlsSpec,
    /// Secret with the user name and password of a role with the REPLICATION attribute.
    pub credentials_secret_ref: CredentialsSecretRef,
}

fn default_pg_port() -> i32 {
    5432
}

/// TLS settings for PostgreSQL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.mode in ['VerifyCa', 'VerifyFull']) || has(self.caSecretRef)").message("caSecretRef is required when mode is VerifyCa or VerifyFull").field_path(".caSecretRef"))]
pub struct PgTlsSpec {
    /// `Disable`, `Prefer` (TLS when the server offers it), `Require`, `VerifyCa`, `VerifyFull`.
    #[serde(default)]
    pub mode: PgSslMode,
    /// CA certificate (PEM) that signs the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Answer a server that asks for the password in clear text (`password`
    /// authentication) over an unencrypted connection. Off by default: with `Prefer`
    /// the connection can fall back to plaintext, and the password would cross the
    /// network readable. Over TLS, or with MD5 or SCRAM, this setting does not matter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_cleartext_password: bool,
}

/// libpq's `sslmode`, in CamelCase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum PgSslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A Secret in the resource's namespace holding a user name and a password.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the user name.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// One key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The outbox table and its columns. Defaults follow Debezium's outbox event router,
/// so an existing Debezium outbox table works unchanged.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(source::TABLE_RULE).message(source::TABLE_MESSAGE).field_path(".table"))]
#[x_kube(validation = Rule::new(source::MESSAGES_RULE).message(source::MESSAGES_MESSAGE).field_path(".messages"))]
#[x_kube(validation = Rule::new(source::DELETE_RULE).message(source::DELETE_MESSAGE).field_path(".deleteAfterRelay"))]
#[x_kube(validation = Rule::new(source::PARTITIONS_RULE).message(source::PARTITIONS_MESSAGE).field_path(".partitions"))]
pub struct OutboxSpec {
    /// `Table` (default): rows inserted into `table`. `Messages`: transactional
    /// `pg_logical_emit_message` messages (PostgreSQL 14+), no table; see `messages`.
    #[serde(default)]
    pub source: OutboxSource,
    /// Schema-qualified table name, e.g. `public.outbox`. Names are used exactly as written (quoted).
    /// Required with source `Table`, absent with `Messages`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$"))]
    pub table: String,
    /// Prefix and emit function of source `Messages` (defaults: `outbox`, `public.outbox_emit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<MessagesSpec>,
    /// Column mapping.
    #[serde(default)]
    pub columns: ColumnMapping,
    /// Delete relayed rows from the table after Kafka acknowledged them. Not needed when the
    /// application deletes the row in the same transaction that inserts it (the WAL still
    /// carries the insert, and the table never grows).
    #[serde(default)]
    pub delete_after_relay: bool,
    /// Time partitions the operator creates ahead and drops once relayed and past
    /// retention (the table must be partitioned by range on a `timestamptz` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<partitions::PartitionsSpec>,
}

/// Names of the outbox table's columns.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// W3C trace context: a tracestate is only meaningful next to the traceparent it
// belongs to, and receivers drop it when the traceparent is absent or invalid.
#[x_kube(validation = Rule::new("!has(self.tracestate) || has(self.traceparent)").message("tracestate needs traceparent: a tracestate header is only valid next to the traceparent it belongs to").field_path(".tracestate"))]
#[x_kube(validation = Rule::new("!has(self.tracestate) || !has(self.traceparent) || self.tracestate != self.traceparent").message("tracestate and traceparent must name different columns").field_path(".tracestate"))]
pub struct ColumnMapping {
    /// Unique event id; sent as the `id` header (consumers deduplicate on it).
    #[serde(default = "col_id")]
    #[schemars(length(min = 1, max = 63))]
    pub id: String,
    /// Aggregate type; the default routing column.
    #[serde(default = "col_aggregate_type")]
    #[schemars(length(min = 1, max = 63))]
    pub aggregate_type: String,
    /// Aggregate id; becomes the record key, so one aggregate's events stay in order in one partition.
    #[serde(default = "col_aggregate_id")]
    #[schemars(length(min = 1, max = 63))]
    pub aggregate_id: String,
    /// Event type; sent as the `type` header.
    #[serde(default = "col_type")]
    #[schemars(length(min = 1, max = 63))]
    pub event_type: String,
    /// Payload, sent as stored (json, jsonb, text or bytea).
    #[serde(default = "col_payload")]
    #[schemars(length(min = 1, max = 63))]
    pub payload: String,
    /// Optional column with a JSON object whose string values become extra record headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub headers: Option<String>,
    /// Optional column whose value becomes the Kafka record timestamp (`timestamptz`, or
    /// `timestamp` read as UTC). Without it the record timestamp is the transaction's
    /// commit time, and so it is for a NULL. An unreadable value (`infinity`, before 1970,
    /// after 9999) does not hold the event up: the record gets the commit time, and
    /// `outbox_relay_envelope_fallbacks_total{kind="InvalidTimestamp"}` counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub timestamp: Option<String>,
    /// Optional integer column that fixes the record's partition. NULL leaves the
    /// partition to the key's hash, as without the column. A negative value, or one the
    /// topic has no partition for, also falls back to the key's hash (the event is not
    /// held up) and is counted as `kind="InvalidPartition"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub partition: Option<String>,
    /// Optional text column with a W3C `traceparent`, sent as the `traceparent` header so
    /// traces continue across the broker. A value that is not
    /// `version-traceid-parentid-flags` is dropped (with its tracestate) and counted as
    /// `kind="InvalidTraceparent"`; the event itself is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub traceparent: Option<String>,
    /// Optional text column with a W3C `tracestate`, sent as the `tracestate` header next
    /// to a valid traceparent. Longer than 512 characters or not printable ASCII: dropped
    /// and counted as `kind="InvalidTracestate"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub tracestate: Option<String>,
    /// Further columns sent as headers, each under its own header name, in each column's
    /// text form (bytea as its bytes). A NULL value sends no header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["header".into()]))]
    pub header_columns: Vec<HeaderColumn>,
}

/// One column sent as one record header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(crate::relay::envelope::RESERVED_HEADERS_CEL).message(crate::relay::envelope::RESERVED_HEADERS_MESSAGE).field_path(".header"))]
pub struct HeaderColumn {
    /// Column name.
    #[schemars(length(min = 1, max = 63))]
    pub column: String,
    /// Header name.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,248}$"))]
    pub header: String,
}

fn col_id() -> String {
    "id".into()
}
fn col_aggregate_type() -> String {
    "aggregatetype".into()
}
fn col_aggregate_id() -> String {
    "aggregateid".into()
}
fn col_type() -> String {
    "type".into()
}
fn col_payload() -> String {
    "payload".into()
}

impl Default for ColumnMapping {
    fn default() -> Self {
        Self {
            id: col_id(),
            aggregate_type: col_aggregate_type(),
            aggregate_id: col_aggregate_id(),
            event_type: col_type(),
            payload: col_payload(),
            headers: None,
            timestamp: None,
            partition: None,
            traceparent: None,
            tracestate: None,
            header_columns: Vec::new(),
        }
    }
}

/// Kafka destination and producer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.topic) != has(self.routeBy)").message("set exactly one of topic and routeBy"))]
pub struct KafkaSpec {
    /// Comma-separated `host:port` list.
    #[schemars(length(min = 1, max = 4096))]
    pub bootstrap_servers: String,
    /// Static topic for every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,249}$"))]
    pub topic: Option<String>,
    /// Route each event by a column's value through a topic template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_by: Option<RouteBy>,
    /// Producer tuning.
    #[serde(default)]
    pub producer: ProducerSpec,
    /// Client security (TLS, SASL).
    #[serde(default)]
    pub security: KafkaSecurity,
    /// Send every record as a CloudEvent in binary content mode (the CloudEvents Kafka
    /// protocol binding): `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_time`
    /// and `content-type` headers, the payload as the event's data. Set it (`{}` takes
    /// the defaults) to turn it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_events: Option<CloudEventsSpec>,
}

/// CloudEvents attributes that do not come from the row. `ce_id` is the event id,
/// `ce_type` the event type, `ce_time` the record timestamp in RFC 3339 (UTC); a
/// NULL id or type leaves that header out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct CloudEventsSpec {
    /// `ce_source`, a URI reference naming the producer. Defaults to
    /// `/outbox/<namespace>/<name>` of this relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[!-~]+$"))]
    pub source: Option<String>,
    /// `content-type` header (the event's `datacontenttype`). Defaults to `application/json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 3, max = 255),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*( *;[ -~]*)?$")
    )]
    pub content_type: Option<String>,
}

/// Topic routing by a column, like Debezium's `route.by.field` and `route.topic.replacement`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteBy {
    /// Column whose value names the topic.
    #[serde(default = "col_aggregate_type")]
    #[schemars(length(min = 1, max = 63))]
    pub column: String,
    /// Topic name with `${routedByValue}` replaced by the column's value.
    #[serde(default = "default_topic_template")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]*\$\{routedByValue\}[A-Za-z0-9._-]*$"))]
    pub topic_template: String,
}

fn default_topic_template() -> String {
    "outbox.event.${routedByValue}".into()
}

/// Producer settings. Idempotence, `acks=all`, unlimited retries and no delivery timeout are always on
/// and cannot be overridden.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProducerSpec {
    /// Batch compression.
    #[serde(default)]
    pub compression: Compression,
    /// How long the producer waits to fill a batch, in milliseconds.
    #[serde(default = "default_linger_ms")]
    #[schemars(range(min = 0, max = 1000))]
    pub linger_ms: i32,
    /// Largest record the relay sends; must not exceed the topic's `max.message.bytes`.
    /// Larger events are handled by `spec.delivery.poisonPolicy`.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1024, max = 104857600))]
    pub max_message_bytes: i32,
    /// Further librdkafka producer properties: tuning knobs only (client.id, batch.size,
    /// batch.num.messages, request.timeout.ms, socket and reconnect settings, ...). Anything that
    /// could weaken delivery, ordering, authentication or TLS, and every librdkafka alias of such a
    /// property, is refused (an allow-list: see the docs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new(crate::kafka::keys::cel_rule()).message(crate::kafka::keys::CEL_MESSAGE))]
    pub config: BTreeMap<String, String>,
}

fn default_linger_ms() -> i32 {
    5
}
fn default_max_message_bytes() -> i32 {
    1_048_576
}

impl Default for ProducerSpec {
    fn default() -> Self {
        Self {
            compression: Compression::default(),
            linger_ms: default_linger_ms(),
            max_message_bytes: default_max_message_bytes(),
            config: BTreeMap::new(),
        }
    }
}

/// Record batch compression codec.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    /// The librdkafka `compression.codec` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Kafka client security.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(self.protocol in ['SaslPlaintext', 'SaslSsl']) || (has(self.saslMechanism) && has(self.credentialsSecretRef))").message("SASL protocols need saslMechanism and credentialsSecretRef").field_path(".credentialsSecretRef"),
)]
pub struct KafkaSecurity {
    /// `Plaintext`, `Ssl`, `SaslPlaintext` or `SaslSsl`.
    #[serde(default)]
    pub protocol: KafkaProtocol,
    /// SASL mechanism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// Secret with the SASL user name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,
    /// CA certificate (PEM) for the brokers' certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// Kafka `security.protocol`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum KafkaProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaProtocol {
    /// The librdkafka `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaProtocol::Plaintext => "plaintext",
            KafkaProtocol::Ssl => "ssl",
            KafkaProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// SASL mechanism.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka `sasl.mechanism` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Replication slot, publication and lag alerting.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSpec {
    /// Logical replication slot. Defaults to one derived from namespace and name.
    /// Cannot change after creation (nor be added or removed): a new slot would start from
    /// the current WAL position and skip events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{1,63}$"))]
    pub slot_name: Option<String>,
    /// Publication for the outbox table. Defaults to one derived from namespace and name.
    /// Cannot change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{1,63}$"))]
    pub publication_name: Option<String>,
    /// Lag thresholds for conditions, Events and alerts.
    #[serde(default)]
    pub lag: LagThresholds,
}

/// Lag thresholds, in bytes of WAL between the server's position and the slot's confirmed position.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.warningBytes < self.criticalBytes").message("warningBytes must be below criticalBytes").field_path(".warningBytes"))]
pub struct LagThresholds {
    /// Lag at which the `SlotHealthy` condition turns False with reason `LagWarning`.
    #[serde(default = "default_lag_warning")]
    #[schemars(range(min = 1))]
    pub warning_bytes: i64,
    /// Lag at which the relay is reported degraded with reason `LagCritical`.
    #[serde(default = "default_lag_critical")]
    #[schemars(range(min = 1))]
    pub critical_bytes: i64,
}

fn default_lag_warning() -> i64 {
    256 * 1024 * 1024
}
fn default_lag_critical() -> i64 {
    4 * 1024 * 1024 * 1024
}

impl Default for LagThresholds {
    fn default() -> Self {
        Self {
            warning_bytes: default_lag_warning(),
            critical_bytes: default_lag_critical(),
        }
    }
}

/// Handling of events Kafka refuses for good (too large, topic missing, not authorized).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.poisonPolicy != 'DeadLetter' || has(self.deadLetterTopic)").message("deadLetterTopic is required when poisonPolicy is DeadLetter").field_path(".deadLetterTopic"))]
pub struct DeliverySpec {
    /// `Stop` (default) halts the relay at the event and reports it, so nothing is lost or reordered;
    /// `DeadLetter` sends it to `deadLetterTopic` with the reason in a header and goes on.
    #[serde(default)]
    pub poison_policy: PoisonPolicy,
    /// Topic for events that cannot be delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,249}$"))]
    pub dead_letter_topic: Option<String>,
}

/// What to do with an event Kafka refuses for good.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PoisonPolicy {
    #[default]
    Stop,
    DeadLetter,
}

/// What deletion of the resource does to the slot and publication.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CleanupPolicy {
    #[default]
    Delete,
    Retain,
}

/// Worker pod settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Image of the worker; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// 1 runs one worker; 2 adds a hot standby that takes the slot over when the active one dies.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 2))]
    pub replicas: i32,
    /// Resource requests and limits of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector of the worker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Log filter of the worker (tracing `EnvFilter` syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            image: None,
            replicas: default_replicas(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            log_level: None,
        }
    }
}

/// Observed state, written by the operator with server-side apply.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and finer conditions; keyed by type so several writers can own different ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Static topic, or the routing template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Facts about the replication slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<SlotStatus>,
    /// Commit time of the last event the relay delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<Time>,
    /// Which PostgreSQL objects this relay owns, and the slot's identity: what loss
    /// detection compares against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<BindingStatus>,
    /// Progress of a deletion that drains the slot before dropping it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStatus>,
    /// Secrets that carry the operator's `outbox.dev/in-use` finalizer because
    /// deleting this relay needs them (the database credentials and CA): a namespace
    /// deletion then cannot remove them before the relay's cleanup ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protected_secrets: Vec<String>,
    /// The last event skipped on request (`outbox.dev/skip-event`), as `<event id>@<commit LSN>`;
    /// written by the worker. The event itself is in the park table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped_event: Option<String>,
    /// Partition management (`spec.outbox.partitions`): what is attached and what
    /// waits to be dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<partitions::PartitionsStatus>,
}

/// The relay's PostgreSQL objects and the identity of its slot, recorded when the
/// operator created (or adopted) the slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BindingStatus {
    /// Replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// The server's system identifier (`pg_control_system()`): it changes when the
    /// database is replaced by another cluster, never on a physical failover.
    pub system_identifier: String,
    /// Database the slot belongs to.
    pub database: String,
    /// WAL position at which the slot started: events committed before it were never
    /// this slot's to relay.
    pub slot_created_lsn: String,
    /// When the operator created the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_created_at: Option<Time>,
    /// Value of the `outbox.dev/recreate-slot` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreated_for: Option<String>,
}

/// A deletion in progress: the operator waits until the slot's confirmed position
/// reaches `targetLsn` before it drops the slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    /// The server's WAL position when the deletion was first seen.
    pub target_lsn: String,
    /// When the drain started.
    pub started_at: Time,
}

/// What PostgreSQL says about the slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// Whether a worker is streaming from it.
    #[serde(default)]
    pub active: bool,
    /// Position up to which the relay confirmed delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_flush_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost` (`pg_replication_slots.wal_status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_status: Option<String>,
    /// WAL bytes between the server's current position and the confirmed position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
}

impl OutboxRelay {
    /// Static topic or routing template, as shown in `kubectl get`.
    pub fn destination(&self) -> String {
        match (&self.spec.kafka.topic, &self.spec.kafka.route_by) {
            (Some(t), _) => t.clone(),
            (None, Some(r)) => r.topic_template.clone(),
            (None, None) => String::new(),
        }
    }
}
