//! What a volume gets, decided from what a Kubernetes front end was given (pure; no I/O): the
//! one place where the hook and the CSI plugin turn their inputs into an engine request.
//!
//! - A PVC (hook, or CSI CreateVolume): its annotations and its StorageClass's parameters. The
//!   StorageClass is the trust boundary: a PVC can name its cache and opt out of writing back,
//!   never opt in beyond its class ([`decide`]).
//! - The CSI volume context of a PV that CreateVolume made ([`volume_context`] writes it,
//!   [`decide_from_context`] reads it back on the node): the same decision, carried to the node.
//! - An inline CSI volume ([`decide_inline`]): the pod's author writes its attributes, so trust
//!   comes only from what kubelet adds (the pod's namespace and service account) checked against
//!   the node's `[csi] inline_write_back`.
//!
//! Every path ends in [`Decision::request`].

use crate::error::{Error, ErrorKind, Result};
use crate::input::names::CacheId;
use crate::input::quantity::{human_bytes, parse_size};
use crate::input::write_back::WriteBack;
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

/// PVC annotation: the scope of the cache the volume reads on top of the cache and writes back
/// into (never into the cache itself).
pub const ANNOTATION_SCOPE: &str = "jobcachefs.io/scope";

/// StorageClass parameter: `"true"` (or `"on-success"`) lets a scoped PVC of a class that does
/// not write back commit into its scope.
pub const PARAM_SCOPE_WRITE_BACK: &str = "jobcachefs.io/scope-write-back";

const PREFIX: &str = "jobcachefs.io/";
const PVC_KEYS: [&str; 3] = [ANNOTATION_CACHE, KEY_WRITE_BACK, ANNOTATION_SCOPE];
const CLASS_KEYS: [&str; 6] = [
    KEY_WRITE_BACK,
    PARAM_SCOPE_WRITE_BACK,
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
    /// Commit on delete (into the scope, for a scoped volume).
    pub write_back: bool,
    /// ... only if the job leaves the success marker (write-back `on-success`).
    pub on_success: bool,
    /// The cache's scope the volume reads on top of the cache and commits into.
    pub scope: Option<String>,
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
    let class_policy = |key: &str| {
        class
            .parameters
            .get(key)
            .map(|v| WriteBack::parse(&format!("{sc}'s parameter {key}"), v))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let class_writes = class_policy(KEY_WRITE_BACK)?;
    let class_scope_writes = class_policy(PARAM_SCOPE_WRITE_BACK)?;
    let claim_writes = claim
        .annotations
        .get(KEY_WRITE_BACK)
        .map(|v| WriteBack::parse(&format!("{pvc}'s annotation {KEY_WRITE_BACK}"), v))
        .transpose()?;
    let mut notes = Vec::new();
    let cache =
        match claim.annotations.get(ANNOTATION_CACHE) {
            Some(name) => Some(CacheId::new(&claim.namespace, name).map_err(|e| {
                Error::invalid(format!("{pvc}'s annotation {ANNOTATION_CACHE}: {e}"))
            })?),
            None => None,
        };
    let scope = claim
        .annotations
        .get(ANNOTATION_SCOPE)
        .map(|s| {
            crate::input::names::validate_label(
                &format!("{pvc}'s annotation {ANNOTATION_SCOPE}"),
                s,
            )
            .map(|()| s.clone())
        })
        .transpose()?;
    if scope.is_some() && cache.is_none() {
        return Err(Error::invalid(format!(
            "{pvc} has annotation {ANNOTATION_SCOPE} but no {ANNOTATION_CACHE}: a scope is a child of a cache, name the cache too"
        )));
    }
    // A scope cannot reach the cache, so a class may grant it alone (scope-write-back); a
    // class that writes back into the cache writes a scoped volume back into its scope.
    let allowed = match &scope {
        Some(_) => class_writes.max(class_scope_writes),
        None => class_writes,
    };
    let policy = match (&cache, claim_writes) {
        (None, _) => WriteBack::Never,
        (Some(_), None) => allowed,
        (Some(_), Some(asked)) => {
            if asked < allowed {
                notes.push(format!("{pvc} narrowed its write-back to {asked}"));
            } else if asked > allowed {
                notes.push(format!(
                    "{pvc} asks for write-back {asked}, but {sc} allows {allowed}{}: it gets {allowed}",
                    if scope.is_some() { " for scoped volumes" } else { "" }
                ));
            }
            allowed.narrowed_by(asked)
        }
    };
    let (write_back, on_success) = policy.flags();
    Ok(Decision {
        cache,
        write_back,
        on_success,
        scope,
        cache_size,
        size: requested,
        cache_mode,
        unique_ids,
        notes,
    })
}

impl Decision {
    /// The engine request for a volume at `dir` with this decision.
    pub fn request(
        &self,
        dir: std::path::PathBuf,
        root: Option<crate::state::records::RootOwner>,
        labels: BTreeMap<String, String>,
        cache_gid: Option<u32>,
    ) -> crate::engine::CreateRequest {
        crate::engine::CreateRequest {
            dir,
            cache: self.cache.clone(),
            size: Some(self.size),
            write_back: self.write_back,
            cache_size: self.cache_size,
            root,
            labels,
            cache_mode: self.cache_mode,
            unique_ids: self.unique_ids,
            cache_gid,
            scope: self.scope.clone(),
            on_success: self.on_success,
        }
    }
}

/// Inline CSI volume attribute: the cache's name in the pod's namespace (required).
pub const ATTR_CACHE: &str = "cache";
/// Inline CSI volume attribute: the volume's size (a quantity, e.g. `4Gi`).
pub const ATTR_SIZE: &str = "size";
/// Inline CSI volume attribute: `overlay` or `clone`, for a cache this volume creates.
pub const ATTR_CACHE_MODE: &str = "cacheMode";
/// Inline CSI volume attribute: `"true"` or `"on-success"` asks to write back (granted by the
/// node's config).
pub const ATTR_WRITE_BACK: &str = "writeBack";
/// Inline CSI volume attribute: the cache's scope to read on top of the cache and commit into.
pub const ATTR_SCOPE: &str = "scope";
const INLINE_KEYS: [&str; 5] = [
    ATTR_CACHE,
    ATTR_SIZE,
    ATTR_CACHE_MODE,
    ATTR_WRITE_BACK,
    ATTR_SCOPE,
];

/// The prefix of the keys kubelet (and the external-provisioner) add to CSI requests.
pub const CSI_PREFIX: &str = "csi.storage.k8s.io/";

/// The pod a CSI volume is published for, as kubelet reports it (`podInfoOnMount: true`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// `csi.storage.k8s.io/pod.namespace`.
    pub namespace: String,
    /// `csi.storage.k8s.io/pod.name`.
    pub name: String,
    /// `csi.storage.k8s.io/pod.uid`.
    pub uid: String,
    /// `csi.storage.k8s.io/serviceAccount.name`.
    pub service_account: String,
}

/// Whether `[csi] inline_write_back` grants writing back to the pod's namespace or its
/// service account there.
/// service account there (`*`: everyone; only `inline_scope_write_back` defaults to it).
pub fn inline_may_write_back(allowed: &[String], pod: &PodFacts) -> bool {
    allowed.iter().any(|entry| match entry.split_once('/') {
        Some((ns, sa)) => ns == pod.namespace && sa == pod.service_account,
        None => *entry == pod.namespace || entry == "*",
    })
}

/// Decides an inline CSI volume from its attributes (the pod author's; kubelet's own
/// `csi.storage.k8s.io/*` keys are skipped) and the pod kubelet reports.
pub fn decide_inline(
    attrs: &BTreeMap<String, String>,
    pod: &PodFacts,
    csi: &crate::input::config::CsiConfig,
) -> Result<Decision> {
    let what = format!("inline volume of pod {}/{}", pod.namespace, pod.name);
    if let Some(k) = attrs
        .keys()
        .find(|k| !k.starts_with(CSI_PREFIX) && !INLINE_KEYS.contains(&k.as_str()))
    {
        return Err(Error::invalid(format!(
            "{what} has unknown volumeAttributes key {k:?}: jobcachefs understands {}",
            INLINE_KEYS.join(", ")
        )));
    }
    let name = attrs.get(ATTR_CACHE).ok_or_else(|| {
        Error::invalid(format!(
            "{what} has no volumeAttributes.{ATTR_CACHE}: name the cache (e.g. cache: maven)"
        ))
    })?;
    let cache = CacheId::new(&pod.namespace, name)
        .map_err(|e| Error::invalid(format!("{what}'s volumeAttributes.{ATTR_CACHE}: {e}")))?;
    let size = match attrs.get(ATTR_SIZE) {
        Some(v) => parse_size(&format!("{what}'s volumeAttributes.{ATTR_SIZE}"), v)?,
        None => csi.inline_default_size,
    };
    if size > csi.inline_max_size {
        return Err(Error::new(
            ErrorKind::Quota,
            format!(
                "{what} asks for volumeAttributes.{ATTR_SIZE} {} ({size} bytes), above this node's csi.inline_max_size of {} ({} bytes): ask for at most {} or use a PVC of a class that allows more",
                human_bytes(size),
                human_bytes(csi.inline_max_size),
                csi.inline_max_size,
                human_bytes(csi.inline_max_size)
            ),
        ));
    }
    let cache_mode = attrs
        .get(ATTR_CACHE_MODE)
        .map(|v| {
            crate::state::records::CacheMode::parse(
                &format!("{what}'s volumeAttributes.{ATTR_CACHE_MODE}"),
                v,
            )
        })
        .transpose()?;
    let asked = attrs
        .get(ATTR_WRITE_BACK)
        .map(|v| WriteBack::parse(&format!("{what}'s volumeAttributes.{ATTR_WRITE_BACK}"), v))
        .transpose()?
        .unwrap_or_default();
    let scope = attrs
        .get(ATTR_SCOPE)
        .map(|s| {
            crate::input::names::validate_label(
                &format!("{what}'s volumeAttributes.{ATTR_SCOPE}"),
                s,
            )
            .map(|()| s.clone())
        })
        .transpose()?;
    let mut notes = Vec::new();
    // A scope cannot reach the cache: its write-back is granted more widely.
    let (granted, list) = match &scope {
        Some(_) => (
            inline_may_write_back(&csi.inline_write_back, pod)
                || inline_may_write_back(&csi.inline_scope_write_back, pod),
            "inline_scope_write_back",
        ),
        None => (
            inline_may_write_back(&csi.inline_write_back, pod),
            "inline_write_back",
        ),
    };
    let policy = if granted { asked } else { WriteBack::Never };
    if asked.writes() && !granted {
        notes.push(format!(
            "{what} asks to write back, but neither namespace {:?} nor service account {}/{} is in this node's [csi] {list}: its changes will be discarded",
            pod.namespace, pod.namespace, pod.service_account
        ));
    }
    let (write_back, on_success) = policy.flags();
    Ok(Decision {
        cache: Some(cache),
        write_back,
        on_success,
        scope,
        cache_size: None,
        size,
        cache_mode,
        unique_ids: false,
        notes,
    })
}

/// Volume context key: the PVC's namespace (the namespace of the volume's cache).
pub const CTX_NAMESPACE: &str = "jobcachefs.io/namespace";
/// Volume context key: the volume's size in bytes.
pub const CTX_SIZE: &str = "jobcachefs.io/size";
/// Volume context key: the PVC's name.
pub const CTX_PVC: &str = "jobcachefs.io/pvc";
/// Volume context key: the PV's name.
pub const CTX_PV: &str = "jobcachefs.io/pv";
/// Volume context key: the StorageClass's name.
pub const CTX_STORAGE_CLASS: &str = "jobcachefs.io/storage-class";

/// The CSI volume context of a PV that CreateVolume provisions for `claim`: everything the
/// node needs, decided once (the PVC's annotations may change later; the PV keeps this).
/// Sizes in bytes, booleans as `"true"`/`"false"`.
pub fn volume_context(
    d: &Decision,
    claim: &ClaimFacts,
    class: &str,
    pv: &str,
) -> BTreeMap<String, String> {
    let mut c = BTreeMap::new();
    c.insert(CTX_NAMESPACE.to_string(), claim.namespace.clone());
    if let Some(id) = &d.cache {
        c.insert(ANNOTATION_CACHE.to_string(), id.name.clone());
    }
    let policy = match (d.write_back, d.on_success) {
        (true, true) => WriteBack::OnSuccess,
        (true, false) => WriteBack::Always,
        _ => WriteBack::Never,
    };
    c.insert(KEY_WRITE_BACK.to_string(), policy.to_string());
    if let Some(s) = &d.scope {
        c.insert(ANNOTATION_SCOPE.to_string(), s.clone());
    }
    c.insert(CTX_SIZE.to_string(), d.size.to_string());
    if let Some(s) = d.cache_size {
        c.insert(PARAM_CACHE_SIZE.to_string(), s.to_string());
    }
    if let Some(m) = d.cache_mode {
        c.insert(PARAM_CACHE_MODE.to_string(), m.to_string());
    }
    c.insert(PARAM_UNIQUE_IDS.to_string(), d.unique_ids.to_string());
    c.insert(CTX_PVC.to_string(), claim.name.clone());
    c.insert(CTX_PV.to_string(), pv.to_string());
    c.insert(CTX_STORAGE_CLASS.to_string(), class.to_string());
    c
}

/// Reads back on the node what [`volume_context`] wrote, for a pod in `pod_namespace`: a PV
/// bound to a PVC of one namespace never serves another namespace's pod its cache.
pub fn decide_from_context(
    volume_id: &str,
    ctx: &BTreeMap<String, String>,
    pod_namespace: &str,
) -> Result<Decision> {
    let what = format!("volume {volume_id:?}");
    let get = |k: &str| {
        ctx.get(k).ok_or_else(|| {
            Error::invalid(format!(
                "{what}'s volume context has no {k:?}: it was not provisioned by jobcachefs's CreateVolume; use a StorageClass with provisioner csi.jobcachefs.io, or an inline volume"
            ))
        })
    };
    let namespace = get(CTX_NAMESPACE)?;
    if namespace != pod_namespace {
        return Err(Error::invalid(format!(
            "{what} belongs to namespace {namespace:?}, but the pod publishing it is in {pod_namespace:?}: caches stay per namespace"
        )));
    }
    let size: u64 = get(CTX_SIZE)?.parse().map_err(|_| {
        Error::invalid(format!(
            "{what}'s volume context {CTX_SIZE} is {:?}: a number of bytes",
            ctx[CTX_SIZE]
        ))
    })?;
    let cache = ctx
        .get(ANNOTATION_CACHE)
        .map(|n| CacheId::new(namespace, n))
        .transpose()?;
    let policy = WriteBack::parse(&format!("{what}'s {KEY_WRITE_BACK}"), get(KEY_WRITE_BACK)?)?;
    let (write_back, on_success) = policy.flags();
    let scope = ctx
        .get(ANNOTATION_SCOPE)
        .map(|s| {
            crate::input::names::validate_label(&format!("{what}'s {ANNOTATION_SCOPE}"), s)
                .map(|()| s.clone())
        })
        .transpose()?;
    let cache_size = ctx
        .get(PARAM_CACHE_SIZE)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                Error::invalid(format!(
                    "{what}'s volume context {PARAM_CACHE_SIZE} is {v:?}: a number of bytes"
                ))
            })
        })
        .transpose()?;
    let cache_mode = ctx
        .get(PARAM_CACHE_MODE)
        .map(|v| {
            crate::state::records::CacheMode::parse(&format!("{what}'s {PARAM_CACHE_MODE}"), v)
        })
        .transpose()?;
    let unique_ids = match ctx.get(PARAM_UNIQUE_IDS) {
        Some(v) => parse_bool(&format!("{what}'s {PARAM_UNIQUE_IDS}"), v)?,
        None => false,
    };
    Ok(Decision {
        write_back: write_back && cache.is_some(),
        on_success: on_success && cache.is_some(),
        scope,
        cache,
        cache_size,
        size,
        cache_mode,
        unique_ids,
        notes: Vec::new(),
    })
}

/// The StorageClass parameters and the PVC/PV names in a CreateVolume's `parameters` (the
/// external-provisioner's `--extra-create-metadata` adds the names under [`CSI_PREFIX`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParameters {
    /// The class's own parameters.
    pub class: BTreeMap<String, String>,
    /// The PVC's namespace.
    pub pvc_namespace: String,
    /// The PVC's name.
    pub pvc_name: String,
    /// The PV's name (the CreateVolume's `name` when absent).
    pub pv_name: Option<String>,
}

/// Splits a CreateVolume's parameters.
pub fn split_create_parameters(params: &BTreeMap<String, String>) -> Result<CreateParameters> {
    let get = |k: &str| {
        params.get(&format!("{CSI_PREFIX}{k}")).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "CreateVolume's parameters lack {CSI_PREFIX}{k}: run the csi-provisioner sidecar with --extra-create-metadata (deploy/csi does)"
            ))
        })
    };
    let pvc_namespace = get("pvc/namespace")?;
    let pvc_name = get("pvc/name")?;
    crate::input::names::validate_label("PVC namespace", &pvc_namespace)?;
    crate::input::names::validate_subdomain("PVC name", &pvc_name)?;
    Ok(CreateParameters {
        class: params
            .iter()
            .filter(|(k, _)| !k.starts_with(CSI_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        pvc_namespace,
        pvc_name,
        pv_name: get("pv/name").ok(),
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
        assert!(d.notes[0].contains("allows false"), "{:?}", d.notes);
    }

    #[test]
    fn on_success_and_scopes_through_pvcs() {
        let c = |ann: &[(&str, &str)]| {
            let mut a = vec![(ANNOTATION_CACHE, "maven")];
            a.extend_from_slice(ann);
            claim(&a)
        };
        let flags = |d: &Decision| (d.write_back, d.on_success, d.scope.clone());
        let pr = Some("pr-7".to_string());
        for (cl, ann, want) in [
            // A class's on-success; a PVC narrows a class's true to on-success, never widens.
            (
                class(&[(KEY_WRITE_BACK, "on-success")]),
                vec![],
                (true, true, None),
            ),
            (
                class(&[(KEY_WRITE_BACK, "true")]),
                vec![(KEY_WRITE_BACK, "on-success")],
                (true, true, None),
            ),
            (
                class(&[(KEY_WRITE_BACK, "on-success")]),
                vec![(KEY_WRITE_BACK, "true")],
                (true, true, None),
            ),
            (
                class(&[(KEY_WRITE_BACK, "on-success")]),
                vec![(KEY_WRITE_BACK, "false")],
                (false, false, None),
            ),
            // scope-write-back lets a scoped PVC of a read-only class commit into its scope…
            (
                class(&[(PARAM_SCOPE_WRITE_BACK, "true")]),
                vec![(ANNOTATION_SCOPE, "pr-7")],
                (true, false, pr.clone()),
            ),
            (
                class(&[(PARAM_SCOPE_WRITE_BACK, "on-success")]),
                vec![(ANNOTATION_SCOPE, "pr-7")],
                (true, true, pr.clone()),
            ),
            // …and never an unscoped one into the cache.
            (
                class(&[(PARAM_SCOPE_WRITE_BACK, "true")]),
                vec![],
                (false, false, None),
            ),
            // A write-back class writes a scoped PVC into its scope (the engine never lets it
            // reach the cache); the PVC can still opt out.
            (
                class(&[(KEY_WRITE_BACK, "true")]),
                vec![(ANNOTATION_SCOPE, "pr-7")],
                (true, false, pr.clone()),
            ),
            (
                class(&[(KEY_WRITE_BACK, "true")]),
                vec![(ANNOTATION_SCOPE, "pr-7"), (KEY_WRITE_BACK, "false")],
                (false, false, pr.clone()),
            ),
            (
                class(&[]),
                vec![(ANNOTATION_SCOPE, "pr-7")],
                (false, false, pr.clone()),
            ),
        ] {
            let d = decide(GI, &c(&ann), &cl).unwrap();
            assert_eq!(flags(&d), want, "{cl:?} {ann:?}");
            let ctx = volume_context(&d, &c(&ann), "sc", "pv-1");
            let back = decide_from_context("pv-1", &ctx, "ci").unwrap();
            assert_eq!(flags(&back), want, "round trip of {ctx:?}");
        }
        for (ann, needle) in [
            (
                vec![(ANNOTATION_SCOPE, "PR_7")],
                "annotation jobcachefs.io/scope \"PR_7\" is invalid",
            ),
            (
                vec![(KEY_WRITE_BACK, "maybe")],
                "use \"true\", \"on-success\" or \"false\"",
            ),
        ] {
            let e = decide(GI, &c(&ann), &class(&[])).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        let e = decide(GI, &claim(&[(ANNOTATION_SCOPE, "pr-7")]), &class(&[])).unwrap_err();
        assert!(
            e.to_string().contains("a scope is a child of a cache"),
            "{e}"
        );
    }

    #[test]
    fn inline_scopes_write_back_for_everyone_by_default() {
        let a = |extra: &[(&str, &str)]| {
            let mut v = vec![(ATTR_CACHE, "maven")];
            v.extend_from_slice(extra);
            attrs(&v)
        };
        let untrusted = pod("pr", "default");
        let scoped = a(&[(ATTR_SCOPE, "pr-7"), (ATTR_WRITE_BACK, "on-success")]);
        let d = decide_inline(&scoped, &untrusted, &csi(&[])).unwrap();
        assert!(d.write_back && d.on_success && d.notes.is_empty(), "{d:?}");
        assert_eq!(d.scope.as_deref(), Some("pr-7"));
        // Without a scope the same pod only reads.
        let d = decide_inline(&a(&[(ATTR_WRITE_BACK, "true")]), &untrusted, &csi(&[])).unwrap();
        assert!(
            !d.write_back && d.notes[0].contains("inline_write_back"),
            "{d:?}"
        );
        // An admin who narrows inline_scope_write_back.
        let mut narrow = csi(&["release"]);
        narrow.inline_scope_write_back = vec!["ci/runner".into()];
        let d = decide_inline(&scoped, &untrusted, &narrow).unwrap();
        assert!(
            !d.write_back && d.notes[0].contains("inline_scope_write_back"),
            "{d:?}"
        );
        let d = decide_inline(&scoped, &pod("ci", "runner"), &narrow).unwrap();
        assert!(d.write_back);
        // Trusted accounts commit a scoped volume into its scope too (never the cache).
        let d = decide_inline(&scoped, &pod("release", "x"), &narrow).unwrap();
        assert!(d.write_back && d.scope.is_some());
        let e = decide_inline(&a(&[(ATTR_SCOPE, "")]), &untrusted, &csi(&[])).unwrap_err();
        assert!(
            e.to_string().contains("volumeAttributes.scope is empty"),
            "{e}"
        );
        let e =
            decide_inline(&a(&[(ATTR_WRITE_BACK, "always")]), &untrusted, &csi(&[])).unwrap_err();
        assert!(
            e.to_string()
                .contains("volumeAttributes.writeBack is \"always\""),
            "{e}"
        );
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

    fn pod(ns: &str, sa: &str) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: "build-1".into(),
            uid: "u-1".into(),
            service_account: sa.into(),
        }
    }

    fn attrs(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn csi(allowed: &[&str]) -> crate::input::config::CsiConfig {
        crate::input::config::CsiConfig {
            inline_write_back: allowed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn inline_write_back_only_for_listed_namespaces_and_accounts() {
        let wb = attrs(&[
            (ATTR_CACHE, "maven"),
            (ATTR_WRITE_BACK, "true"),
            ("csi.storage.k8s.io/pod.namespace", "forged"),
        ]);
        for (allowed, ns, sa, want) in [
            (vec!["release"], "release", "default", true),
            (vec!["release/builder"], "release", "builder", true),
            (vec!["release/builder"], "release", "default", false),
            (vec!["release/builder"], "pr", "builder", false),
            (vec!["release"], "releases", "default", false),
            (vec![], "release", "builder", false),
        ] {
            let d = decide_inline(&wb, &pod(ns, sa), &csi(&allowed)).unwrap();
            assert_eq!(d.write_back, want, "{allowed:?} {ns}/{sa}");
            // The cache is the pod's namespace's, whatever the attributes say.
            assert_eq!(d.cache, Some(CacheId::new(ns, "maven").unwrap()));
            assert_eq!(d.notes.is_empty(), want, "{:?}", d.notes);
        }
        let d = decide_inline(&wb, &pod("pr", "x"), &csi(&[])).unwrap();
        assert!(d.notes[0].contains("discarded"), "{:?}", d.notes);
        // Not asked: no write-back, no note, even where it would be allowed.
        let ro = attrs(&[(ATTR_CACHE, "maven")]);
        let d = decide_inline(&ro, &pod("release", "b"), &csi(&["release"])).unwrap();
        assert!(!d.write_back && d.notes.is_empty());
        assert_eq!(
            d.size,
            crate::input::config::CsiConfig::default().inline_default_size
        );
    }

    #[test]
    fn inline_attributes_are_checked_and_named() {
        for (a, kind, needle) in [
            (
                attrs(&[]),
                ErrorKind::InvalidInput,
                "volumeAttributes.cache",
            ),
            (
                attrs(&[(ATTR_CACHE, "Maven_Repo")]),
                ErrorKind::InvalidInput,
                "Maven_Repo",
            ),
            (
                attrs(&[(ATTR_CACHE, "m"), (ATTR_SIZE, "4Xi")]),
                ErrorKind::InvalidInput,
                "4Xi",
            ),
            (
                attrs(&[(ATTR_CACHE, "m"), (ATTR_SIZE, "1Ti")]),
                ErrorKind::Quota,
                "inline_max_size",
            ),
            (
                attrs(&[(ATTR_CACHE, "m"), (ATTR_CACHE_MODE, "copy")]),
                ErrorKind::InvalidInput,
                "copy",
            ),
            (
                attrs(&[(ATTR_CACHE, "m"), (ATTR_WRITE_BACK, "yes")]),
                ErrorKind::InvalidInput,
                "\"yes\"",
            ),
            (
                attrs(&[(ATTR_CACHE, "m"), ("writeback", "true")]),
                ErrorKind::InvalidInput,
                "\"writeback\"",
            ),
            (
                attrs(&[(ATTR_CACHE, "m"), (KEY_WRITE_BACK, "true")]),
                ErrorKind::InvalidInput,
                KEY_WRITE_BACK,
            ),
        ] {
            let e = decide_inline(&a, &pod("ci", "default"), &csi(&["ci"])).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn volume_context_round_trips_and_stays_in_its_namespace() {
        let cl = class(&[
            (KEY_WRITE_BACK, "true"),
            (PARAM_CACHE_SIZE, "20Gi"),
            (PARAM_CACHE_MODE, "clone"),
        ]);
        let d = decide(GI, &claim(&[(ANNOTATION_CACHE, "gradle")]), &cl).unwrap();
        let ctx = volume_context(&d, &claim(&[]), "jobcache-csi", "pvc-1");
        assert_eq!(ctx[CTX_PVC], "job-1-cache");
        let back = decide_from_context("pvc-1", &ctx, "ci").unwrap();
        assert_eq!(back.cache, d.cache);
        assert_eq!(back.write_back, d.write_back);
        assert_eq!(back.size, d.size);
        assert_eq!(back.cache_size, d.cache_size);
        assert_eq!(back.cache_mode, d.cache_mode);
        let e = decide_from_context("pvc-1", &ctx, "other").unwrap_err();
        assert!(e.to_string().contains("caches stay per namespace"), "{e}");
        let e = decide_from_context("pvc-1", &BTreeMap::new(), "ci").unwrap_err();
        assert!(e.to_string().contains(CTX_NAMESPACE), "{e}");
        let mut bad = ctx.clone();
        bad.insert(CTX_SIZE.into(), "2Gi".into());
        assert!(decide_from_context("pvc-1", &bad, "ci").is_err());
    }

    #[test]
    fn create_parameters_split_off_the_provisioners_keys() {
        let p = attrs(&[
            (KEY_WRITE_BACK, "true"),
            ("csi.storage.k8s.io/pvc/name", "gradle-cache"),
            ("csi.storage.k8s.io/pvc/namespace", "ci"),
            ("csi.storage.k8s.io/pv/name", "pvc-9"),
        ]);
        let s = split_create_parameters(&p).unwrap();
        assert_eq!(s.class, attrs(&[(KEY_WRITE_BACK, "true")]));
        assert_eq!(
            (s.pvc_namespace.as_str(), s.pvc_name.as_str()),
            ("ci", "gradle-cache")
        );
        assert_eq!(s.pv_name.as_deref(), Some("pvc-9"));
        let e = split_create_parameters(&attrs(&[(KEY_WRITE_BACK, "true")])).unwrap_err();
        assert!(e.to_string().contains("--extra-create-metadata"), "{e}");
    }
}
