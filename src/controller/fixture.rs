//! Test fixtures: `OutboxRelay::test()` and `with_*` modifiers, so a unit test
//! states only what matters to it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::{
    CredentialsSecretRef, KafkaProtocol, OutboxRelay, OutboxRelaySpec, PgSslMode, SaslMechanism, SecretKeyRef,
};
use crate::controller::dereference::Dereferenced;

impl OutboxRelay {
    /// `shop/orders`: table `public.outbox` in database `orders` on `orders-db`,
    /// credentials in Secret `orders-db`, static topic `orders.events`.
    pub(crate) fn test() -> Self {
        let spec: OutboxRelaySpec = serde_json::from_value(serde_json::json!({
            "database": {"host": "orders-db", "database": "orders", "credentialsSecretRef": {"name": "orders-db"}},
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": "kafka:9092", "topic": "orders.events"}
        }))
        .unwrap_or_else(|e| panic!("fixture spec: {e}"));
        let mut r = OutboxRelay::new("orders", spec);
        r.metadata = ObjectMeta {
            name: Some("orders".into()),
            namespace: Some("shop".into()),
            uid: Some("0b5c7e4e-7f5e-4d43-9a51-5f0b0c6f0a01".into()),
            generation: Some(3),
            ..ObjectMeta::default()
        };
        r
    }

    pub(crate) fn with_pg_ca(mut self, secret: &str, key: &str) -> Self {
        self.spec.database.tls.mode = PgSslMode::VerifyFull;
        self.spec.database.tls.ca_secret_ref = Some(SecretKeyRef {
            name: secret.into(),
            key: key.into(),
        });
        self
    }

    pub(crate) fn with_kafka_sasl(mut self, secret: &str) -> Self {
        let sec = &mut self.spec.kafka.security;
        sec.protocol = KafkaProtocol::SaslSsl;
        sec.sasl_mechanism = Some(SaslMechanism::ScramSha512);
        sec.credentials_secret_ref = Some(CredentialsSecretRef {
            name: secret.into(),
            username_key: "user".into(),
            password_key: "pass".into(),
        });
        self
    }

    pub(crate) fn with_kafka_ca(mut self, secret: &str, key: &str) -> Self {
        self.spec.kafka.security.ca_secret_ref = Some(SecretKeyRef {
            name: secret.into(),
            key: key.into(),
        });
        self
    }

    pub(crate) fn with_suspend(mut self, suspend: bool) -> Self {
        self.spec.suspend = suspend;
        self
    }

    pub(crate) fn with_lag(mut self, warning: i64, critical: i64) -> Self {
        self.spec.replication.lag.warning_bytes = warning;
        self.spec.replication.lag.critical_bytes = critical;
        self
    }

    pub(crate) fn with_worker(mut self, f: impl FnOnce(&mut crate::api::WorkerSpec)) -> Self {
        f(&mut self.spec.worker);
        self
    }
}

impl Dereferenced {
    /// What dereferencing [`OutboxRelay::test`] finds.
    pub(crate) fn test() -> Self {
        Dereferenced {
            db_username: "relay".into(),
            db_password: "s3cret".into(),
            pg_ca_pem: None,
            secret_versions: [("orders-db".to_string(), "1001".to_string())].into_iter().collect(),
            unguarded: Default::default(),
        }
    }
}
