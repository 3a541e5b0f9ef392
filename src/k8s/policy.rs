//! What a volume gets, decided from the PVC's annotations and its StorageClass's parameters
//! (pure; no I/O). The StorageClass is the trust boundary: a PVC can name its cache and opt out
//! of writing back, never opt in beyond its class.

use crate::error::{Error, ErrorKind, Result};
use crate::input::names::CacheId;
use crate::input::quantity::{human_bytes, parse_size};
use std::collections::BTreeMap;

/// PVC annotation: the cache's name in the PVC's namespace.
pub const ANNOTATION_CACHE: &str = "jobcachefs.io/cache";
/// PVC annotation and StorageClass parameter: write the volume back into its cache on delete.
pub const KEY_WRITE_BACK: &str = "jobcachefs.io/write-back";
/// StorageClass parameter: size limit of each cache used through the class.
pub const PARAM_CACHE_SIZE: &str = "jobcachefs.io/cache-size";
/// StorageClass parameter: the largest volume a PVC of the class may request.
pub const PARAM_MAX_VOLUME_SIZE: &str = "jobcachefs.io/max-volume-size";

/// StorageClass parameter: `overlay` (default) or `clone`, the mode of caches the class creates.
pub const PARAM_CACHE_MODE: &str = "jobcachefs.io/cache-mode";

/// StorageClass parameter: `"true"` gives each volume a node-unique UID and each cache a
/// cluster-unique GID.
pub const PARAM_UNIQUE_IDS: &str = "jobcachefs.io/unique-ids";

const PREFIX: &str = "jobcachefs.io/";
const PVC_KEYS: [&str; 2] = [ANNOTATION_CACHE, KEY_WRITE_BACK];
const CLASS_KEYS: [&str; 5] = [
    KEY_WRITE_BACK,
    PARAM_CACHE_SIZE,
    PARAM_MAX_VOLUME_SIZE,
    PARAM_CACHE_MODE,
    PARAM_UNIQUE_IDS,
];

/// The facts of the PVC that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimFacts {
    /// The PVC's namespace.
    pub namespace: String,
    /// The PVC's name.
    pub name: String,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The facts of the StorageClass that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassFacts {
    /// The class's name.
    pub name: String,
    /// Its parameters.
    pub parameters: BTreeMap<String, String>,
}

/// What the volume gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The cache below the volume; `None`: a plain, size-limited, empty volume.
    pub cache: Option<CacheId>,
    /// Commit into the cache on delete.
    pub write_back: bool,
    /// Size limit for the cache, if this volume creates it.
    pub cache_size: Option<u64>,
    /// The volume's size limit in bytes.
    pub size: u64,
    /// The class's cache mode, if it names one.
    pub cache_mode: Option<crate::state::records::CacheMode>,
    /// Per-volume identities.
    pub unique_ids: bool,
    /// Things the operator should know (an opt-in the class does not allow, …).
    pub notes: Vec<String>,
}

fn parse_bool(what: &str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Error::invalid(format!(
            "{what} is {other:?}: use \"true\" or \"false\""
        ))),
    }
}

fn check_known(what: &str, map: &BTreeMap<String, String>, known: &[&str]) -> Result<()> {
    match map
        .keys()
        .find(|k| k.starts_with(PREFIX) && !known.contains(&k.as_str()))
    {
        Some(k) => Err(Error::invalid(format!(
            "{what} has unknown key {k:?}: jobcachefs understands {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Decides the volume for a request of `requested` bytes.
pub(crate) fn decide(requested: u64, claim: &ClaimFacts, class: &ClassFacts) -> Result<Decision> {
    let pvc = format!("PVC {}/{}", claim.namespace, claim.name);
    let sc = format!("StorageClass {:?}", class.name);
    check_known(
        &format!("{pvc}'s annotations"),
        &claim.annotations,
        &PVC_KEYS,
    )?;
    check_known(
        &format!("{sc}'s parameters"),
        &class.parameters,
        &CLASS_KEYS,
    )?;
    if requested == 0 {
        return Err(Error::invalid(format!(
            "{pvc} requests 0 bytes: set spec.resources.requests.storage (e.g. 2Gi)"
        )));
    }
    if let Some(max) = class.parameters.get(PARAM_MAX_VOLUME_SIZE) {
        let max = parse_size(&format!("{sc}'s {PARAM_MAX_VOLUME_SIZE}"), max)?;
        if requested > max {
            return Err(Error::new(
                ErrorKind::Quota,
                format!(
                    "{pvc} requests {} ({requested} bytes), above {sc}'s {PARAM_MAX_VOLUME_SIZE} of {} ({max} bytes): request at most {} or use another class",
                    human_bytes(requested),
                    human_bytes(max),
                    human_bytes(max)
                ),
            ));
        }
    }
    let cache_size = class
        .parameters
        .get(PARAM_CACHE_SIZE)
        .map(|v| parse_size(&format!("{sc}'s {PARAM_CACHE_SIZE}"), v))
        .transpose()?;
    let cache_mode = class
        .parameters
        .get(PARAM_CACHE_MODE)
        .map(|v| {
            crate::state::records::CacheMode::parse(
                &format!("{sc}'s parameter {PARAM_CACHE_MODE}"),
                v,
            )
        })
        .transpose()?;
    let unique_ids = match class.parameters.get(PARAM_UNIQUE_IDS) {
        Some(v) => parse_bool(&format!("{sc}'s parameter {PARAM_UNIQUE_IDS}"), v)?,
        None => false,
    };
    let class_writes = match class.parameters.get(KEY_WRITE_BACK) {
        Some(v) => parse_bool(&format!("{sc}'s parameter {KEY_WRITE_BACK}"), v)?,
        None => false,
    };
    let claim_writes = claim
        .annotations
        .get(KEY_WRITE_BACK)
        .map(|v| parse_bool(&format!("{pvc}'s annotation {KEY_WRITE_BACK}"), v))
        .transpose()?;
    let mut notes = Vec::new();
    let cache =
        match claim.annotations.get(ANNOTATION_CACHE) {
            Some(name) => Some(CacheId::new(&claim.namespace, name).map_err(|e| {
                Error::invalid(format!("{pvc}'s annotation {ANNOTATION_CACHE}: {e}"))
            })?),
            None => None,
        };
    let write_back = match (&cache, class_writes, claim_writes) {
        (None, _, _) => false,
        (Some(_), true, Some(false)) => {
            notes.push(format!("{pvc} opted out of writing back"));
            false
        }
        (Some(_), false, Some(true)) => {
            notes.push(format!(
                "{pvc} asks to write back, but {sc} does not allow it: the volume is read-only for its cache"
            ));
            false
        }
        (Some(_), class_writes, _) => class_writes,
    };
    Ok(Decision {
        cache,
        write_back,
        cache_size,
        size: requested,
        cache_mode,
        unique_ids,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(ann: &[(&str, &str)]) -> ClaimFacts {
        ClaimFacts {
            namespace: "ci".into(),
            name: "job-1-cache".into(),
            annotations: ann
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn class(params: &[(&str, &str)]) -> ClassFacts {
        ClassFacts {
            name: "jobcache-writeback".into(),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const GI: u64 = 1 << 30;

    #[test]
    fn write_back_needs_the_class_and_no_opt_out() {
        let wb = class(&[(KEY_WRITE_BACK, "true")]);
        let ro = class(&[(KEY_WRITE_BACK, "false")]);
        let none = class(&[]);
        let c = |v: Option<&str>| match v {
            Some(v) => claim(&[(ANNOTATION_CACHE, "maven"), (KEY_WRITE_BACK, v)]),
            None => claim(&[(ANNOTATION_CACHE, "maven")]),
        };
        for (cl, pvc, want) in [
            (&wb, None, true),
            (&wb, Some("true"), true),
            (&wb, Some("false"), false),
            (&ro, None, false),
            (&ro, Some("true"), false),
            (&none, Some("true"), false),
            (&none, None, false),
        ] {
            let d = decide(GI, &c(pvc), cl).unwrap();
            assert_eq!(d.write_back, want, "{cl:?} {pvc:?}");
            assert_eq!(d.cache, Some(CacheId::new("ci", "maven").unwrap()));
        }
        let d = decide(GI, &c(Some("true")), &ro).unwrap();
        assert!(d.notes[0].contains("does not allow"), "{:?}", d.notes);
    }

    #[test]
    fn no_annotation_is_a_plain_volume() {
        let d = decide(3 * GI, &claim(&[]), &class(&[(KEY_WRITE_BACK, "true")])).unwrap();
        assert_eq!(d.cache, None);
        assert!(!d.write_back);
        assert_eq!(d.size, 3 * GI);
    }

    #[test]
    fn max_volume_size_names_both_numbers() {
        let cl = class(&[(PARAM_MAX_VOLUME_SIZE, "4Gi")]);
        decide(4 * GI, &claim(&[]), &cl).unwrap();
        let e = decide(8 * GI, &claim(&[]), &cl).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Quota);
        let m = e.to_string();
        assert!(m.contains("8.0 GiB") && m.contains("4.0 GiB"), "{m}");
        assert!(m.contains("8589934592") && m.contains("4294967296"), "{m}");
    }

    #[test]
    fn cache_size_parameter() {
        let d = decide(
            GI,
            &claim(&[(ANNOTATION_CACHE, "npm")]),
            &class(&[(PARAM_CACHE_SIZE, "20Gi")]),
        )
        .unwrap();
        assert_eq!(d.cache_size, Some(20 * GI));
    }

    #[test]
    fn bad_values_name_key_and_value() {
        for (c, cl, needle) in [
            (
                claim(&[(ANNOTATION_CACHE, "Maven_Repo")]),
                class(&[]),
                "Maven_Repo",
            ),
            (
                claim(&[(ANNOTATION_CACHE, "m"), (KEY_WRITE_BACK, "yes")]),
                class(&[]),
                "\"yes\"",
            ),
            (claim(&[]), class(&[(KEY_WRITE_BACK, "1")]), "\"1\""),
            (claim(&[]), class(&[(PARAM_CACHE_SIZE, "10Xi")]), "10Xi"),
            (claim(&[]), class(&[(PARAM_MAX_VOLUME_SIZE, "-1")]), "-1"),
            (
                claim(&[("jobcachefs.io/writeback", "true")]),
                class(&[]),
                "jobcachefs.io/writeback",
            ),
            (
                claim(&[]),
                class(&[("jobcachefs.io/cachesize", "1Gi")]),
                "jobcachefs.io/cachesize",
            ),
        ] {
            let e = decide(GI, &c, &cl).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(needle), "{e}");
        }
        // Other prefixes belong to others.
        decide(
            GI,
            &claim(&[("example.com/x", "y")]),
            &class(&[("type", "z")]),
        )
        .unwrap();
        assert!(decide(0, &claim(&[]), &class(&[])).is_err());
    }
}
