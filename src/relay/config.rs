//! The worker's runtime configuration, resolved from an `OutboxRelay` spec plus
//! the credentials the pod receives (environment variables filled from Secrets,
//! CA files mounted from Secrets). Pure: reading the environment happens in
//! [`Credentials::from_env`], everything else is a function of its inputs.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use super::core::EventRef;
use super::envelope::{self, CloudEvents};
use super::mapping::{Destination, ROUTED_BY_VALUE};
use super::replication::ReplicationConfig;
use crate::api::names::{default_publication_name, default_slot_name};
use crate::api::{ColumnMapping, OutboxRelaySpec, PoisonPolicy};
use crate::kafka::KafkaSettings;
use crate::postgres::{PgConnectConfig, QualifiedTable};

/// Environment variables the worker reads its secrets from.
pub mod env {
    pub const DB_USERNAME: &str = "OUTBOX_DB_USERNAME";
    pub const DB_PASSWORD: &str = "OUTBOX_DB_PASSWORD";
    pub const KAFKA_USERNAME: &str = "OUTBOX_KAFKA_USERNAME";
    pub const KAFKA_PASSWORD: &str = "OUTBOX_KAFKA_PASSWORD";
    pub const PG_CA_FILE: &str = "OUTBOX_PG_CA_FILE";
    pub const KAFKA_CA_FILE: &str = "OUTBOX_KAFKA_CA_FILE";
    /// `<event id>@<commit LSN>` of the one event to park instead of delivering
    /// (the operator copies the `outbox.dev/skip-event` annotation into it).
    pub const SKIP_EVENT: &str = "OUTBOX_SKIP_EVENT";
}

// Resolving `spec.outbox.source` lives in a file of its own; it is still this module's code.
#[path = "config_source.rs"]
mod source;
pub use source::{MessageSource, PollSettings};
use source::{polling, source};

/// Annotation naming the one event to skip (park) to get past a Stop.
pub const SKIP_EVENT_ANNOTATION: &str = "outbox.dev/skip-event";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("environment variable {0} is not set (the worker's Secret reference is missing or has no such key)")]
    MissingEnv(&'static str),
    #[error("outbox table: {0}")]
    InvalidTable(String),
    #[error("cannot read {what} {path}: {detail}")]
    UnreadableFile {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("relay spec: {0}")]
    InvalidSpecFile(String),
    #[error("spec.kafka sets neither topic nor routeBy")]
    NoDestination,
    #[error("topic template {0:?} does not contain ${{routedByValue}}")]
    InvalidTemplate(String),
    #[error("database port {0} is out of range")]
    InvalidPort(i32),
    #[error("spec.delivery.poisonPolicy is DeadLetter but deadLetterTopic is not set")]
    NoDeadLetterTopic,
    #[error("skip request (outbox.dev/skip-event): {0}")]
    InvalidSkip(String),
    #[error("spec.kafka.producer.config: {0}")]
    ForbiddenProducerKey(String),
    #[error("spec.outbox.columns: {0}")]
    InvalidColumns(String),
    #[error("spec.outbox: {0}")]
    InvalidSource(String),
}

impl ConfigError {
    pub fn category(&self) -> &'static str {
        match self {
            ConfigError::MissingEnv(_) => "SecretKeyMissing",
            _ => "InvalidSpec",
        }
    }
}

/// Secrets as the worker sees them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub db_username: String,
    pub db_password: Option<String>,
    pub kafka_username: Option<String>,
    pub kafka_password: Option<String>,
    pub pg_ca_file: Option<PathBuf>,
    /// Contents of `pg_ca_file`, read once at start-up: the SQL and the
    /// replication connection both take PEM bytes (`crate::postgres::tls`).
    pub pg_ca_pem: Option<Vec<u8>>,
    pub kafka_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Credentials {
    // Hand-written so secrets never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("db_username", &self.db_username)
            .field("kafka_username", &self.kafka_username)
            .field("pg_ca_file", &self.pg_ca_file)
            .field("kafka_ca_file", &self.kafka_ca_file)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn from_env() -> Result<Self, ConfigError> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let pg_ca_file = get(env::PG_CA_FILE).map(PathBuf::from);
        let pg_ca_pem = match &pg_ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| ConfigError::UnreadableFile {
                what: "PostgreSQL CA file",
                path: p.display().to_string(),
                detail: e.to_string(),
            })?),
            None => None,
        };
        Ok(Self {
            db_username: get(env::DB_USERNAME).ok_or(ConfigError::MissingEnv(env::DB_USERNAME))?,
            db_password: get(env::DB_PASSWORD),
            kafka_username: get(env::KAFKA_USERNAME),
            kafka_password: get(env::KAFKA_PASSWORD),
            pg_ca_file,
            pg_ca_pem,
            kafka_ca_file: get(env::KAFKA_CA_FILE).map(PathBuf::from),
        })
    }
}

/// A relay definition read from a file: a whole `OutboxRelay` resource (name and
/// namespace from its metadata) or a bare spec. YAML or JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecFile {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// The `outbox.dev/skip-event` annotation, when the file is a whole resource.
    pub skip_event: Option<String>,
    pub spec: OutboxRelaySpec,
}

impl SpecFile {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value =
            serde_norway::from_str(text).map_err(|e| ConfigError::InvalidSpecFile(e.to_string()))?;
        let (name, namespace, skip_event, spec) = match value.get("spec") {
            Some(spec) => {
                let meta = value.get("metadata");
                let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(|v| v.as_str()).map(str::to_string);
                let skip = meta
                    .and_then(|m| m.get("annotations"))
                    .and_then(|a| a.get(SKIP_EVENT_ANNOTATION))
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                (field("name"), field("namespace"), skip, spec.clone())
            }
            None => (None, None, None, value),
        };
        let spec = serde_json::from_value(spec).map_err(|e| ConfigError::InvalidSpecFile(e.to_string()))?;
        Ok(Self {
            name,
            namespace,
            skip_event,
            spec,
        })
    }
}

/// Knobs with good defaults; tests and benchmarks shorten some of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    /// Standby status update at least this often, even with nothing new
    /// (PostgreSQL drops a silent client after `wal_sender_timeout`, 60 s by default).
    pub status_interval: Duration,
    /// A newly confirmable position is sent after at most this long.
    pub confirm_interval: Duration,
    /// Reading WAL pauses while this many events wait for Kafka.
    pub max_in_flight: usize,
    /// ... or once their records hold this many bytes: bounds the producer's memory
    /// (librdkafka keeps a copy of every record until it is acknowledged).
    pub max_in_flight_bytes: usize,
    /// With events in flight and no acknowledgement for this long, the worker reports not ready.
    pub stall_after: Duration,
    /// Pause between attempts after a failed session (doubles up to `max_backoff`).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How often a standby worker tries to take the slot over.
    pub standby_poll: Duration,
    /// On shutdown, how long to wait for Kafka to acknowledge what is in flight.
    pub drain_timeout: Duration,
    /// After a status update that asks for a reply, how long the server may stay
    /// silent before the connection is taken for hung and replaced.
    pub reply_timeout: Duration,
    /// `mode: Polling`: bound on each statement of a batch. A poll connection that
    /// goes silent ends the session past it; the next one ends the silent backend,
    /// which still holds the poller's lock and the batch's row locks.
    pub poll_statement_timeout: Duration,
    /// `mode: Polling`: how long a batch waits for Kafka's answers with its
    /// transaction (and row locks) open; past it the batch is rolled back, so an
    /// outage does not hold back vacuum on the whole database, and polled again.
    pub poll_ack_timeout: Duration,
    /// `/healthz` fails once a streaming session heard nothing from the server for
    /// this long (the kubelet then restarts the worker). Above
    /// `status_interval + reply_timeout`, so the session's own timeout acts first.
    pub liveness_bound: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            status_interval: Duration::from_secs(10),
            confirm_interval: Duration::from_millis(100),
            max_in_flight: crate::kafka::MAX_IN_FLIGHT,
            max_in_flight_bytes: 16 * 1024 * 1024,
            stall_after: Duration::from_secs(15),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            standby_poll: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
            poll_statement_timeout: Duration::from_secs(30),
            poll_ack_timeout: Duration::from_secs(60),
            liveness_bound: Duration::from_secs(60),
        }
    }
}

/// Everything one worker needs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub namespace: String,
    pub name: String,
    pub replication: ReplicationConfig,
    pub slot: String,
    pub publication: String,
    /// SQL connection (only used for `deleteAfterRelay`).
    pub sql: PgConnectConfig,
    /// The outbox table. With `source: Messages` there is none, and this is only the
    /// name the park table derives from: `<function schema>.<slot name>`, never read
    /// or published (see [`RelayConfig::messages`]).
    pub table: QualifiedTable,
    /// `source: Messages`: the prefix to relay and the emit function. `None`: the table.
    pub messages: Option<MessageSource>,
    /// `mode: Polling`: read and delete rows instead of streaming a slot.
    pub poll: Option<PollSettings>,
    pub columns: ColumnMapping,
    pub destination: Destination,
    /// CloudEvents binary-mode headers, when `spec.kafka.cloudEvents` is set.
    pub cloud_events: Option<CloudEvents>,
    pub kafka: KafkaSettings,
    pub max_message_bytes: usize,
    pub poison: PoisonPolicy,
    pub dead_letter_topic: Option<String>,
    pub delete_after_relay: bool,
    /// The one event to park instead of delivering (skip request).
    pub skip: Option<EventRef>,
    /// Write the `Delivering` condition and read skip requests on the resource
    /// (set by the rendered Deployment; off for a worker outside Kubernetes).
    pub report_status: bool,
    pub tuning: Tuning,
}

impl RelayConfig {
    pub fn from_spec(
        namespace: &str,
        name: &str,
        spec: &OutboxRelaySpec,
        creds: &Credentials,
    ) -> Result<Self, ConfigError> {
        let slot = spec
            .replication
            .slot_name
            .clone()
            .unwrap_or_else(|| default_slot_name(namespace, name));
        let (table, messages) = source(spec, &slot)?;
        let poll = polling(spec)?;
        let destination = match (&spec.kafka.topic, &spec.kafka.route_by) {
            (Some(t), _) => Destination::Static(t.clone()),
            (None, Some(r)) => {
                if !r.topic_template.contains(ROUTED_BY_VALUE) {
                    return Err(ConfigError::InvalidTemplate(r.topic_template.clone()));
                }
                Destination::Routed {
                    column: r.column.clone(),
                    template: r.topic_template.clone(),
                }
            }
            (None, None) => return Err(ConfigError::NoDestination),
        };
        if spec.delivery.poison_policy == PoisonPolicy::DeadLetter && spec.delivery.dead_letter_topic.is_none() {
            return Err(ConfigError::NoDeadLetterTopic);
        }
        // The API server checks this too (CEL); a spec file never passed it.
        crate::kafka::keys::check(spec.kafka.producer.config.keys().map(String::as_str))
            .map_err(ConfigError::ForbiddenProducerKey)?;
        check_envelope_columns(&spec.outbox.columns).map_err(ConfigError::InvalidColumns)?;
        // One set of connection settings; the replication connection derives from it.
        let sql = PgConnectConfig::from_spec(
            &spec.database,
            &creds.db_username,
            creds.db_password.clone(),
            creds.pg_ca_pem.clone(),
            format!("outbox-relay/{namespace}/{name}"),
        )
        .map_err(|_| ConfigError::InvalidPort(spec.database.port))?;
        let replication = ReplicationConfig::from_connect(&sql);

        let p = &spec.kafka.producer;
        let s = &spec.kafka.security;
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            replication,
            slot,
            publication: spec
                .replication
                .publication_name
                .clone()
                .unwrap_or_else(|| default_publication_name(namespace, name)),
            sql,
            table,
            messages,
            poll,
            columns: spec.outbox.columns.clone(),
            destination,
            cloud_events: spec
                .kafka
                .cloud_events
                .as_ref()
                .map(|c| CloudEvents::new(namespace, name, c.source.as_deref(), c.content_type.as_deref())),
            kafka: KafkaSettings {
                bootstrap_servers: spec.kafka.bootstrap_servers.clone(),
                compression: p.compression,
                linger_ms: p.linger_ms,
                max_message_bytes: p.max_message_bytes,
                extra: p.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                protocol: s.protocol,
                sasl_mechanism: s.sasl_mechanism,
                sasl_username: creds.kafka_username.clone(),
                sasl_password: creds.kafka_password.clone(),
                ca_location: creds.kafka_ca_file.clone(),
            },
            max_message_bytes: usize::try_from(p.max_message_bytes).unwrap_or(usize::MAX),
            poison: spec.delivery.poison_policy,
            dead_letter_topic: spec.delivery.dead_letter_topic.clone(),
            delete_after_relay: spec.outbox.delete_after_relay,
            skip: None,
            report_status: false,
            tuning: Tuning::default(),
        })
    }

    /// Adds a skip request (`<event id>@<commit LSN>`); empty means none.
    pub fn with_skip(mut self, skip: Option<&str>) -> Result<Self, ConfigError> {
        self.skip = match skip.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => Some(s.parse::<EventRef>().map_err(ConfigError::InvalidSkip)?),
            None => None,
        };
        Ok(self)
    }
}

/// The envelope column rules the API server checks (CEL, list keys), again for
/// spec files, which never passed it.
fn check_envelope_columns(c: &ColumnMapping) -> Result<(), String> {
    if c.tracestate.is_some() && c.traceparent.is_none() {
        return Err(
            "tracestate needs traceparent: a tracestate header is only valid next to the traceparent it belongs to"
                .into(),
        );
    }
    if c.tracestate.is_some() && c.tracestate == c.traceparent {
        return Err("tracestate and traceparent must name different columns".into());
    }
    let mut seen = std::collections::HashSet::new();
    for h in &c.header_columns {
        if let Some(why) = envelope::reserved_header(&h.header) {
            return Err(format!(
                "headerColumns: header {:?} (column {:?}) is reserved: {why}; pick another header name",
                h.header, h.column
            ));
        }
        if !seen.insert(h.header.as_str()) {
            return Err(format!("headerColumns: header {:?} is listed twice", h.header));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::*;

    pub fn spec() -> OutboxRelaySpec {
        serde_json::from_value(serde_json::json!({
            "database": {"host": "db", "database": "shop", "credentialsSecretRef": {"name": "pg"}},
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": "k:9092", "topic": "orders"}
        }))
        .unwrap()
    }

    fn creds() -> Credentials {
        Credentials {
            db_username: "relay".into(),
            db_password: Some("pw".into()),
            ..Credentials::default()
        }
    }

    #[test]
    fn defaults_from_a_minimal_spec() {
        let c = RelayConfig::from_spec("shop", "orders", &spec(), &creds()).unwrap();
        assert_eq!(c.slot, "outbox_shop_orders");
        assert_eq!(c.publication, "outbox_shop_orders");
        assert_eq!((c.table.schema.as_str(), c.table.name.as_str()), ("public", "outbox"));
        assert_eq!(c.destination, Destination::Static("orders".into()));
        assert_eq!(c.replication.port, 5432);
        assert_eq!(c.replication.ssl_mode, PgSslMode::Prefer);
        assert_eq!(c.kafka.compression, Compression::Lz4);
        assert_eq!(c.max_message_bytes, 1_048_576);
        assert_eq!(c.poison, PoisonPolicy::Stop);
    }

    #[test]
    fn routing_and_explicit_names() {
        let mut s = spec();
        s.kafka.topic = None;
        s.kafka.route_by = Some(RouteBy {
            column: "aggregatetype".into(),
            topic_template: "ev.${routedByValue}".into(),
        });
        s.replication.slot_name = Some("my_slot".into());
        let c = RelayConfig::from_spec("a", "b", &s, &creds()).unwrap();
        assert_eq!(c.slot, "my_slot");
        assert!(matches!(c.destination, Destination::Routed { .. }));
    }

    #[test]
    fn polling_mode_resolves_its_settings_and_refuses_a_mismatch() {
        let creds = Credentials::default();
        let mut spec = spec();
        assert_eq!(RelayConfig::from_spec("ns", "r", &spec, &creds).unwrap().poll, None);
        spec.mode = crate::api::RelayMode::Polling;
        let err = RelayConfig::from_spec("ns", "r", &spec, &creds).unwrap_err();
        assert!(err.to_string().contains("needs spec.polling"), "{err}");
        let mut p = crate::api::PollingSpec::with_order_column("seq");
        p.min_interval_ms = 50;
        p.max_interval_ms = 20;
        spec.polling = Some(p);
        let poll = RelayConfig::from_spec("ns", "r", &spec, &creds).unwrap().poll.unwrap();
        assert_eq!(poll.order_column, "seq");
        assert_eq!(poll.min_interval, Duration::from_millis(50));
        assert_eq!(poll.max_interval, Duration::from_millis(50), "max never below min");
        spec.outbox.partitions = Some(
            serde_json::from_value(serde_json::json!({"column": "created_at", "interval": "Daily", "retention": "7d"}))
                .unwrap(),
        );
        let err = RelayConfig::from_spec("ns", "r", &spec, &creds).unwrap_err();
        assert!(err.to_string().contains("mode Polling reads rows"), "{err}");
    }

    fn messages_spec() -> OutboxRelaySpec {
        serde_json::from_value(serde_json::json!({
            "database": {"host": "db", "database": "shop", "credentialsSecretRef": {"name": "pg"}},
            "outbox": {"source": "Messages", "messages": {"function": "app.emit"}},
            "kafka": {"bootstrapServers": "k:9092", "topic": "orders"}
        }))
        .unwrap()
    }

    #[test]
    fn messages_need_no_table_and_park_by_slot() {
        let c = RelayConfig::from_spec("shop", "orders", &messages_spec(), &creds()).unwrap();
        let m = c.messages.as_ref().unwrap();
        assert_eq!(m.prefix, "outbox");
        assert_eq!(m.function.unquoted(), "app.emit");
        // The park table is named from the slot, in the function's schema.
        assert_eq!(c.table.unquoted(), "app.outbox_shop_orders");
        assert!(c.messages.is_some() && !c.delete_after_relay);
        assert!(
            RelayConfig::from_spec("a", "b", &spec(), &creds())
                .unwrap()
                .messages
                .is_none()
        );
    }

    #[test]
    fn messages_refuse_what_they_would_ignore() {
        let mut s = messages_spec();
        s.outbox.table = "public.outbox".into();
        assert!(matches!(
            RelayConfig::from_spec("a", "b", &s, &creds()).unwrap_err(),
            ConfigError::InvalidSource(_)
        ));
        let mut s = messages_spec();
        s.outbox.delete_after_relay = true;
        assert!(RelayConfig::from_spec("a", "b", &s, &creds()).is_err());
        let mut s = messages_spec();
        s.kafka.topic = None;
        s.kafka.route_by = Some(RouteBy {
            column: "kind".into(),
            topic_template: "ev.${routedByValue}".into(),
        });
        assert!(RelayConfig::from_spec("a", "b", &s, &creds()).is_err());
        let mut s = spec();
        s.outbox.messages = Some(MessagesSpec::default());
        assert!(RelayConfig::from_spec("a", "b", &s, &creds()).is_err());
    }

    #[test]
    fn bad_inputs_are_named() {
        let mut s = spec();
        s.outbox.table = "outbox".into();
        assert!(matches!(
            RelayConfig::from_spec("a", "b", &s, &creds()).unwrap_err(),
            ConfigError::InvalidTable(_)
        ));
        let mut s = spec();
        s.kafka.topic = None;
        assert_eq!(
            RelayConfig::from_spec("a", "b", &s, &creds()).unwrap_err(),
            ConfigError::NoDestination
        );
        let mut s = spec();
        s.delivery.poison_policy = PoisonPolicy::DeadLetter;
        assert_eq!(
            RelayConfig::from_spec("a", "b", &s, &creds()).unwrap_err(),
            ConfigError::NoDeadLetterTopic
        );
        let mut s = spec();
        s.kafka
            .producer
            .config
            .insert("delivery.timeout.ms".into(), "5000".into());
        let e = RelayConfig::from_spec("a", "b", &s, &creds()).unwrap_err();
        assert!(e.to_string().contains("alias of message.timeout.ms"), "{e}");
    }

    #[test]
    fn envelope_options_resolve_and_bad_combinations_are_named() {
        let c = RelayConfig::from_spec("shop", "orders", &spec(), &creds()).unwrap();
        assert_eq!(c.cloud_events, None, "off unless set");
        let mut s = spec();
        s.kafka.cloud_events = Some(CloudEventsSpec::default());
        let c = RelayConfig::from_spec("shop", "orders", &s, &creds()).unwrap();
        let ce = c.cloud_events.expect("on");
        assert_eq!(&ce.source[..], b"/outbox/shop/orders");
        assert_eq!(&ce.content_type[..], b"application/json");

        fn header(column: &str, header: &str) -> HeaderColumn {
            HeaderColumn {
                column: column.into(),
                header: header.into(),
            }
        }
        type Change = fn(&mut ColumnMapping);
        let cases: Vec<(Change, &str)> = vec![
            (|c| c.tracestate = Some("ts".into()), "tracestate needs traceparent"),
            (
                |c| {
                    c.traceparent = Some("tp".into());
                    c.tracestate = Some("tp".into());
                },
                "different columns",
            ),
            (|c| c.header_columns = vec![header("a", "ce_id")], "is reserved"),
            (|c| c.header_columns = vec![header("a", "traceparent")], "is reserved"),
            (
                |c| c.header_columns = vec![header("a", "x"), header("b", "x")],
                "listed twice",
            ),
        ];
        for (change, expect) in cases {
            let mut s = spec();
            change(&mut s.outbox.columns);
            let e = RelayConfig::from_spec("a", "b", &s, &creds()).unwrap_err();
            assert!(matches!(e, ConfigError::InvalidColumns(_)), "{e}");
            assert!(e.to_string().contains(expect), "{e}");
        }
        let mut s = spec();
        s.outbox.columns.traceparent = Some("tp".into());
        s.outbox.columns.tracestate = Some("ts".into());
        s.outbox.columns.header_columns = vec![header("tenant", "x-tenant")];
        assert!(RelayConfig::from_spec("a", "b", &s, &creds()).is_ok());
    }

    #[test]
    fn spec_file_takes_a_resource_or_a_bare_spec() {
        let resource = "apiVersion: outbox.dev/v1alpha1\nkind: OutboxRelay\nmetadata: {name: orders, namespace: shop}\nspec:\n  database: {host: db, database: shop, credentialsSecretRef: {name: pg}}\n  outbox: {table: public.outbox}\n  kafka: {bootstrapServers: 'k:9092', topic: orders}\n";
        let f = SpecFile::parse(resource).unwrap();
        assert_eq!(
            (f.name.as_deref(), f.namespace.as_deref()),
            (Some("orders"), Some("shop"))
        );
        assert_eq!(f.spec, spec());
        assert_eq!(f.skip_event, None);
        let annotated = resource.replace(
            "namespace: shop}",
            "namespace: shop, annotations: {outbox.dev/skip-event: 'e1@0/16B3748'}}",
        );
        let f = SpecFile::parse(&annotated).unwrap();
        assert_eq!(f.skip_event.as_deref(), Some("e1@0/16B3748"));
        let c = RelayConfig::from_spec("a", "b", &f.spec, &creds())
            .unwrap()
            .with_skip(f.skip_event.as_deref())
            .unwrap();
        assert_eq!(c.skip.map(|s| s.to_string()), Some("e1@0/16B3748".to_string()));
        assert!(matches!(
            RelayConfig::from_spec("a", "b", &f.spec, &creds())
                .unwrap()
                .with_skip(Some("nonsense")),
            Err(ConfigError::InvalidSkip(_))
        ));
        let bare = serde_json::to_string(&spec()).unwrap();
        assert_eq!(SpecFile::parse(&bare).unwrap().spec, spec());
        assert!(matches!(
            SpecFile::parse("database: 3"),
            Err(ConfigError::InvalidSpecFile(_))
        ));
    }

    #[test]
    fn credentials_debug_hides_secrets() {
        let text = format!("{:?}", creds());
        assert!(!text.contains("pw"), "{text}");
    }
}
