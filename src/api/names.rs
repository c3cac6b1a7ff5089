//! Default names of PostgreSQL objects derived from a resource's namespace and name.
//!
//! Kubernetes names allow `-` and `.` and run to 253 characters; PostgreSQL slot names
//! allow only `[a-z0-9_]` and 63 bytes. The mapping must be stable (the operator finds
//! its slot again after a restart) and must not make two resources collide, so a
//! truncated name carries a hash of the full one.

const MAX_IDENT: usize = 63;

/// Default replication slot name for `namespace/name`.
pub fn default_slot_name(namespace: &str, name: &str) -> String {
    derive("outbox", namespace, name)
}

/// Default publication name for `namespace/name`.
pub fn default_publication_name(namespace: &str, name: &str) -> String {
    derive("outbox", namespace, name)
}

fn derive(prefix: &str, namespace: &str, name: &str) -> String {
    let raw = format!("{prefix}_{namespace}_{name}");
    let mut clean: String = raw
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    // `a-b/c` and `a_b/c` sanitize to the same string; the hash of the raw
    // name keeps them apart whenever sanitizing changed anything.
    if clean.len() > MAX_IDENT || clean != raw {
        let suffix = format!("_{:08x}", fnv1a32(raw.as_bytes()));
        clean.truncate(MAX_IDENT - suffix.len());
        clean.push_str(&suffix);
    }
    clean
}

/// FNV-1a: tiny, and unlike `DefaultHasher` its output never changes between releases.
fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn plain_names_stay_readable() {
        assert_eq!(default_slot_name("shop", "orders"), "outbox_shop_orders");
    }

    #[test]
    fn dashes_are_replaced_and_disambiguated() {
        let a = default_slot_name("team-a", "orders");
        let b = default_slot_name("team_a", "orders");
        assert!(valid(&a), "{a}");
        assert!(a.starts_with("outbox_team_a_orders_"), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn long_names_are_truncated_with_a_hash() {
        let long = "x".repeat(200);
        let a = default_slot_name("ns", &long);
        let b = default_slot_name("ns", &format!("{long}y"));
        assert!(valid(&a) && valid(&b));
        assert_eq!(a.len(), 63);
        assert_ne!(a, b);
    }

    #[test]
    fn stable_across_calls() {
        assert_eq!(default_slot_name("a.b", "C-d"), default_slot_name("a.b", "C-d"));
        assert!(valid(&default_publication_name("a.b", "C-d")));
    }
}
