//! Cache and namespace names: DNS-1123 labels, validated before anything touches the disk.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest DNS-1123 label.
pub const MAX_LABEL_LEN: usize = 63;

/// The namespace used when none is given (outside Kubernetes).
pub const DEFAULT_NAMESPACE: &str = "default";

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
    let bytes = value.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !bytes.iter().all(ok_char) || !alnum(&bytes[0]) || !alnum(&bytes[bytes.len() - 1]) {
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
    fn cache_id_checks_both_parts() {
        assert!(CacheId::new("ns", "c").is_ok());
        assert!(CacheId::new("Ns", "c")
            .unwrap_err()
            .to_string()
            .contains("namespace"));
        assert_eq!(CacheId::new("ns", "c").unwrap().to_string(), "ns/c");
    }
}
