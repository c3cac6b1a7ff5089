//! Which librdkafka properties users may set through `spec.kafka.producer.config`.
//!
//! An allow-list, not a deny-list: librdkafka accepts several names for one
//! property (`delivery.timeout.ms` is `message.timeout.ms`, `acks` is
//! `request.required.acks`, ...), all land in one map, and which one wins
//! depends on the order they are set. A deny-list has to know every alias of
//! every protected key, forever; an allow-list of canonical names of harmless
//! tuning knobs cannot be bypassed by a name it did not foresee. The same list
//! builds the CRD's CEL rule ([`cel_rule`]) and is enforced again by the worker
//! ([`check`]) for specs that did not pass the API server (a spec file).
//!
//! [`PROTECTED`] names what the relay sets itself and why, with every alias
//! librdkafka 2.12 knows for it (`CONFIGURATION.md`), so a refusal can say what
//! to use instead, and the tests can try every alias.

/// Tuning knobs that cannot weaken delivery, ordering, authentication or TLS.
/// Canonical names only: none is an alias of another property.
pub const ALLOWED: &[&str] = &[
    "client.id",
    "client.rack",
    "batch.num.messages",
    "batch.size",
    "compression.level",
    "sticky.partitioning.linger.ms",
    "request.timeout.ms",
    "retry.backoff.ms",
    "retry.backoff.max.ms",
    "socket.timeout.ms",
    "socket.connection.setup.timeout.ms",
    "socket.keepalive.enable",
    "socket.nagle.disable",
    "socket.send.buffer.bytes",
    "socket.receive.buffer.bytes",
    "connections.max.idle.ms",
    "reconnect.backoff.ms",
    "reconnect.backoff.max.ms",
    "metadata.max.age.ms",
    "topic.metadata.refresh.interval.ms",
    "topic.metadata.refresh.fast.interval.ms",
    "topic.metadata.refresh.sparse",
    "broker.address.family",
    "broker.address.ttl",
    "client.dns.lookup",
    "allow.auto.create.topics",
    "statistics.interval.ms",
    "api.version.request.timeout.ms",
    "message.copy.max.bytes",
    "queue.buffering.backpressure.threshold",
    "debug",
    "log.connection.close",
];

/// A property the relay sets (or forbids), its aliases, and why.
#[derive(Clone, Copy, Debug)]
pub struct Protected {
    pub key: &'static str,
    pub aliases: &'static [&'static str],
    pub why: &'static str,
}

/// Every property the relay owns, with all its librdkafka aliases.
pub const PROTECTED: &[Protected] = &[
    Protected {
        key: "enable.idempotence",
        aliases: &[],
        why: "retries must neither duplicate nor reorder a partition",
    },
    Protected {
        key: "request.required.acks",
        aliases: &["acks"],
        why: "a record counts as delivered only once all in-sync replicas have it",
    },
    Protected {
        key: "max.in.flight.requests.per.connection",
        aliases: &["max.in.flight"],
        why: "idempotent ordering holds for at most 5 requests in flight",
    },
    Protected {
        key: "message.timeout.ms",
        aliases: &["delivery.timeout.ms"],
        why: "the relay never gives up on a record; it stalls and keeps the WAL instead",
    },
    Protected {
        key: "message.send.max.retries",
        aliases: &["retries"],
        why: "a record is retried until delivered",
    },
    Protected {
        key: "enable.gapless.guarantee",
        aliases: &[],
        why: "gap handling is the relay's (it confirms only acknowledged prefixes)",
    },
    Protected {
        key: "transactional.id",
        aliases: &[],
        why: "the relay does not use Kafka transactions",
    },
    Protected {
        key: "metadata.broker.list",
        aliases: &["bootstrap.servers"],
        why: "set spec.kafka.bootstrapServers",
    },
    Protected {
        key: "queue.buffering.max.ms",
        aliases: &["linger.ms"],
        why: "set spec.kafka.producer.lingerMs",
    },
    Protected {
        key: "compression.codec",
        aliases: &["compression.type"],
        why: "set spec.kafka.producer.compression",
    },
    Protected {
        key: "message.max.bytes",
        aliases: &[],
        why: "set spec.kafka.producer.maxMessageBytes",
    },
    Protected {
        key: "queue.buffering.max.messages",
        aliases: &[],
        why: "sized by the relay above its own in-flight bound",
    },
    Protected {
        key: "queue.buffering.max.kbytes",
        aliases: &[],
        why: "sized by the relay above its own in-flight bound",
    },
    Protected {
        key: "partitioner",
        aliases: &[],
        why: "key to partition must match the Java client (murmur2) so an aggregate stays in one partition",
    },
    Protected {
        key: "delivery.report.only.error",
        aliases: &[],
        why: "the relay confirms positions from successful delivery reports",
    },
    Protected {
        key: "security.protocol",
        aliases: &[],
        why: "set spec.kafka.security.protocol",
    },
    Protected {
        key: "sasl.mechanisms",
        aliases: &["sasl.mechanism"],
        why: "set spec.kafka.security.saslMechanism",
    },
    Protected {
        key: "sasl.username",
        aliases: &[],
        why: "credentials come from spec.kafka.security.credentialsSecretRef",
    },
    Protected {
        key: "sasl.password",
        aliases: &[],
        why: "credentials come from spec.kafka.security.credentialsSecretRef",
    },
    Protected {
        key: "ssl.ca.location",
        aliases: &[],
        why: "the CA comes from spec.kafka.security.caSecretRef",
    },
    // TLS-weakening keys are refused outright: a relay that would accept any
    // broker certificate would hand events (and SASL passwords) to whoever answers.
    // A private CA is trusted through caSecretRef instead.
    Protected {
        key: "enable.ssl.certificate.verification",
        aliases: &[],
        why: "broker certificates are always verified (trust a private CA with caSecretRef)",
    },
    Protected {
        key: "ssl.endpoint.identification.algorithm",
        aliases: &[],
        why: "broker host names are always verified (trust a private CA with caSecretRef)",
    },
    Protected {
        key: "topic.metadata.propagation.max.ms",
        aliases: &[],
        why: "set by the relay so a missing topic is reported promptly",
    },
];

/// Every alias of a protected property, with the canonical name.
pub fn aliases() -> impl Iterator<Item = (&'static str, &'static str)> {
    PROTECTED
        .iter()
        .flat_map(|p| p.aliases.iter().map(move |a| (*a, p.key)))
}

/// Canonical name of `key` (itself unless it is a known alias).
pub fn canonical(key: &str) -> &str {
    aliases().find(|(a, _)| *a == key).map_or(key, |(_, k)| k)
}

/// Why `key` may not be set, or `None` when it may.
pub fn refusal(key: &str) -> Option<String> {
    if ALLOWED.contains(&key) {
        return None;
    }
    let canon = canonical(key);
    Some(match PROTECTED.iter().find(|p| p.key == canon) {
        Some(p) if canon != key => format!("{key} (librdkafka's alias of {canon}) is set by the relay: {}", p.why),
        Some(p) => format!("{key} is set by the relay: {}", p.why),
        None => format!(
            "{key} is not among the producer properties the relay accepts ({})",
            ALLOWED.join(", ")
        ),
    })
}

/// Checks a user's producer properties; the first refused key explains itself.
pub fn check<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    match keys.into_iter().find_map(refusal) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// The CRD's CEL rule on `spec.kafka.producer.config`: every key on the allow-list.
pub fn cel_rule() -> String {
    let list = ALLOWED.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
    format!("self.all(k, k in [{list}])")
}

/// The rule's message.
pub const CEL_MESSAGE: &str = "config accepts only librdkafka tuning properties that cannot weaken delivery, ordering or TLS (see the docs for the list); idempotence, acks, in-flight limits, timeouts, retries, compression, linger, sizes, partitioner, security and their aliases are set by the relay or by their own spec fields";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protected_key_and_every_alias_is_refused() {
        for p in PROTECTED {
            let why = refusal(p.key).unwrap_or_else(|| panic!("{} accepted", p.key));
            assert!(why.contains(p.why), "{why}");
            for a in p.aliases {
                let why = refusal(a).unwrap_or_else(|| panic!("alias {a} accepted"));
                assert!(why.contains(&format!("alias of {}", p.key)), "{why}");
            }
        }
        for k in [
            "delivery.timeout.ms",
            "acks",
            "request.required.acks",
            "linger.ms",
            "queue.buffering.max.ms",
            "compression.type",
            "compression.codec",
            "max.in.flight",
            "retries",
            "bootstrap.servers",
            "enable.ssl.certificate.verification",
            "ssl.endpoint.identification.algorithm",
            "dr_msg_cb",
        ] {
            assert!(refusal(k).is_some(), "{k} must be refused");
        }
    }

    #[test]
    fn the_allow_list_holds_no_alias_and_no_protected_key() {
        for k in ALLOWED {
            assert_eq!(canonical(k), *k, "{k} is an alias");
            assert!(PROTECTED.iter().all(|p| p.key != *k), "{k} is protected");
            assert_eq!(refusal(k), None);
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_the_list() {
        let why = refusal("ssl.key.password").expect("refused");
        assert!(why.contains("batch.size"), "{why}");
        assert!(check(["batch.size", "linger.ms"]).unwrap_err().contains("lingerMs"));
        assert_eq!(check(["batch.size", "client.id"]), Ok(()));
    }

    #[test]
    fn the_cel_rule_lists_exactly_the_allowed_keys() {
        let rule = cel_rule();
        for k in ALLOWED {
            assert!(rule.contains(&format!("'{k}'")), "{k}");
        }
        for (alias, key) in aliases() {
            assert!(!rule.contains(&format!("'{alias}'")) && !rule.contains(&format!("'{key}'")));
        }
    }
}
