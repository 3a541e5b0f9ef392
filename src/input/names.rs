//! Names, validated before anything touches the disk: cache and namespace names (DNS-1123
//! labels), Kubernetes object names (DNS-1123 subdomains), layer ids and repository paths. One
//! character rule, [`name_chars`], under all of them.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest DNS-1123 label.
pub const MAX_LABEL_LEN: usize = 63;

/// The namespace used when none is given (outside Kubernetes).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Longest DNS-1123 subdomain (PV and PVC names).
pub(crate) const MAX_SUBDOMAIN_LEN: usize = 253;

/// Whether every byte of `value` is a lower-case ASCII letter, a digit, '-' or one of `extra`.
pub(crate) fn name_chars(value: &str, extra: &[u8]) -> bool {
    value
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || extra.contains(&c))
}

/// Whether `value` is a DNS-1123 label of at most `max` bytes: [`name_chars`], starting and
/// ending with a letter or digit.
fn is_label(value: &str, max: usize) -> bool {
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && name_chars(value, b"")
        && alnum(&b[0])
        && alnum(&b[b.len() - 1])
}

/// Checks a DNS-1123 subdomain (the form of PV and PVC names): labels joined by '.'.
pub(crate) fn validate_subdomain(what: &str, value: &str) -> Result<()> {
    if value.len() <= MAX_SUBDOMAIN_LEN && value.split('.').all(|l| is_label(l, MAX_SUBDOMAIN_LEN))
    {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {value:?} is not a Kubernetes object name (lower-case letters, digits, '-' and '.', at most 253)"
        )))
    }
}

/// Whether `id` can be a layer id read from a registry (it becomes a file name).
pub(crate) fn is_layer_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 100 && name_chars(id, b"")
}

/// Checks that `value` is a DNS-1123 label; `what` names the field in the error.
pub fn validate_label(what: &str, value: &str) -> Result<()> {
    let fix = "use lower-case letters, digits and '-', starting and ending with a letter or digit (at most 63)";
    if value.is_empty() {
        return Err(Error::invalid(format!("{what} is empty: {fix}")));
    }
    if value.len() > MAX_LABEL_LEN {
        return Err(Error::invalid(format!(
            "{what} {value:?} is {} characters long: {fix}",
            value.chars().count()
        )));
    }
    if !is_label(value, MAX_LABEL_LEN) {
        return Err(Error::invalid(format!(
            "{what} {value:?} is invalid: {fix}"
        )));
    }
    Ok(())
}

/// A validated `(namespace, name)` pair naming one cache.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CacheId {
    /// Namespace the cache belongs to; one namespace never names another's cache.
    pub namespace: String,
    /// Cache name inside the namespace.
    pub name: String,
}

impl CacheId {
    /// Validates both parts.
    pub fn new(namespace: &str, name: &str) -> Result<Self> {
        validate_label("namespace", namespace)?;
        validate_label("cache name", name)?;
        Ok(CacheId {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for CacheId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_labels() {
        for ok in ["a", "maven-repo", "0", "a1-b2", &"x".repeat(63)] {
            validate_label("cache name", ok).unwrap();
        }
    }

    #[test]
    fn rejects_bad_labels_naming_the_value() {
        for bad in [
            "",
            "../x",
            "A_B",
            "Maven",
            "-a",
            "a-",
            "a.b",
            "a/b",
            "ünï",
            "a b",
            &"x".repeat(64),
        ] {
            let err = validate_label("cache name", bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("cache name"), "{msg}");
            if !bad.is_empty() && bad.len() < 64 {
                assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            }
            assert!(msg.contains("lower-case"), "{msg}");
        }
    }

    #[test]
    fn subdomains_and_layer_ids() {
        for ok in ["a", "pvc-1", "a.b-c.d", &"x".repeat(63)] {
            validate_subdomain("n", ok).unwrap();
        }
        for bad in ["", ".a", "a.", "a..b", "A", "a_b", "-a", &"x".repeat(254)] {
            assert!(validate_subdomain("n", bad).is_err(), "{bad}");
        }
        assert!(is_layer_id("-0a-"));
        assert!(!is_layer_id(""));
        assert!(!is_layer_id("a/b"));
        assert!(!is_layer_id(&"a".repeat(101)));
    }

    #[test]
    fn cache_id_checks_both_parts() {
        assert!(CacheId::new("ns", "c").is_ok());
        assert!(CacheId::new("Ns", "c")
            .unwrap_err()
            .to_string()
            .contains("namespace"));
        assert_eq!(CacheId::new("ns", "c").unwrap().to_string(), "ns/c");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Modest case counts; nothing written into the source tree on failure.
    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// RFC 1123 label, written out from the definition without the code under test: 1 to 63
    /// characters, each a lower-case ASCII letter, a digit or '-', not starting or ending in '-'.
    fn reference_label(s: &str, max: usize) -> bool {
        let chars: Vec<char> = s.chars().collect();
        let ok = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '-');
        !chars.is_empty()
            && chars.len() <= max
            && chars.iter().all(|&c| ok(c))
            && chars[0] != '-'
            && chars[chars.len() - 1] != '-'
    }

    fn reference_subdomain(s: &str) -> bool {
        s.len() <= 253 && s.split('.').all(|l| reference_label(l, 253))
    }

    /// Strings around the boundary: the allowed characters, their near misses, any length up
    /// to past the limit.
    fn near_labels() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z0-9-]{0,70}",
            "[a-z0-9][a-z0-9-]{60,62}[a-z0-9]",
            "[a-zA-Z0-9._/ \u{e9}\u{fc}-]{0,66}",
            "[a-z0-9.-]{0,260}",
        ]
    }

    proptest! {
        #![proptest_config(config(512))]

        /// Accepted labels are exactly the DNS-1123 labels; a refusal names the field, and the
        /// value when it is short enough to show.
        #[test]
        fn labels_are_exactly_dns_1123(s in near_labels()) {
            let r = validate_label("cache name", &s);
            prop_assert_eq!(r.is_ok(), reference_label(&s, MAX_LABEL_LEN), "{:?}", s);
            if let Err(e) = r {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("cache name"), "{msg}");
                prop_assert!(msg.contains("lower-case letters"), "{msg}");
            }
        }

        #[test]
        fn subdomains_are_exactly_dns_1123(s in near_labels()) {
            prop_assert_eq!(
                validate_subdomain("PVC name", &s).is_ok(),
                reference_subdomain(&s),
                "{:?}", s
            );
        }

        #[test]
        fn layer_ids_are_short_name_chars(s in near_labels()) {
            let want = (1..=100).contains(&s.len())
                && s.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'));
            prop_assert_eq!(is_layer_id(&s), want, "{:?}", s);
        }

        /// A cache id is made only of two labels, and shows as `namespace/name`.
        #[test]
        fn cache_ids_are_two_labels(ns in near_labels(), name in near_labels()) {
            match CacheId::new(&ns, &name) {
                Ok(id) => {
                    prop_assert!(reference_label(&ns, 63) && reference_label(&name, 63));
                    prop_assert_eq!(id.to_string(), format!("{ns}/{name}"));
                }
                Err(_) => prop_assert!(!(reference_label(&ns, 63) && reference_label(&name, 63))),
            }
        }
    }
}
