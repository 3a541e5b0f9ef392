//! The placement decision for one admitted Pod, and the AdmissionReview v1 answer that carries
//! it. Pure but for [`Claims`], which answers what the Pod alone does not say (a PVC's class and
//! annotation, a class's provisioner, whether any node is warm).
//!
//! The contract (README "Placement"):
//! - A Pod uses a cache through an inline CSI volume of `csi.jobcachefs.io` with a `cache`
//!   attribute, a generic ephemeral volume whose claim template has the `jobcachefs.io/cache`
//!   annotation and a jobcachefs class, or a PVC with that annotation and such a class. The
//!   cache's namespace is the Pod's.
//! - For each cache, one preferred nodeAffinity term `cache.jobcachefs.io/<key> Exists` with
//!   weight [`WEIGHT`]: a node warm for every cache of the Pod scores highest, one warm for some
//!   in between (the NodeAffinity plugin sums the weights of the terms a node matches and
//!   normalises them across nodes, so only the ratios matter).
//! - Annotation `jobcachefs.io/placement` on the Pod: `off` (no change), `required` (the terms
//!   become requiredDuringScheduling: only warm nodes; when no node is warm for one of its
//!   caches yet, preferred instead, with a warning, so a Pod is never stranded), `preferred`
//!   (the default).
//! - A Pod that places itself (a nodeSelector, node affinity of its own, or a nodeName) is left
//!   as it is: its author decided.
//! - Nothing here fails a Pod: a review that cannot be read is allowed unchanged.

use crate::input::names::CacheId;
use crate::k8s::placement::label_key;
use crate::k8s::policy::{ANNOTATION_CACHE, ATTR_CACHE};
use base64::Engine as _;
use serde_json::{json, Value};

/// The Pod annotation that chooses the placement.
pub const ANNOTATION_PLACEMENT: &str = "jobcachefs.io/placement";
/// The Pod annotation the webhook writes: what it did, for `kubectl describe`.
pub const ANNOTATION_PLACED: &str = "jobcachefs.io/placed";
/// The weight of one cache's preferred term (the API's maximum).
pub const WEIGHT: u32 = 100;
/// Provisioners of jobcachefs classes: the CSI driver and the provisioner hook's deploy/.
pub const PROVISIONERS: [&str; 2] = [crate::csi::DRIVER_NAME, "jobcachefs.io/local-path"];

/// What the webhook must ask the API.
pub trait Claims {
    /// Whether StorageClass `class` is jobcachefs' (`None`: could not tell).
    fn class_is_ours(&self, class: &str) -> Option<bool>;
    /// The class and the cache annotation of PVC `namespace/name` (`None`: no such PVC, or it
    /// could not be read).
    fn pvc(&self, namespace: &str, name: &str) -> Option<(Option<String>, Option<String>)>;
    /// Whether any Node carries label `key` (`None`: could not tell).
    fn any_node_has(&self, key: &str) -> Option<bool>;
}

/// What was decided for a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not a Pod create, or no cache in its volumes.
    NoCache,
    /// `jobcachefs.io/placement: off`.
    OptedOut,
    /// The Pod places itself.
    OwnPlacement,
    /// Preferred terms added.
    Preferred,
    /// Required terms added.
    Required,
}

impl Outcome {
    /// For the log and the annotation.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::NoCache => "no-cache",
            Outcome::OptedOut => "opted-out",
            Outcome::OwnPlacement => "own-placement",
            Outcome::Preferred => "preferred",
            Outcome::Required => "required",
        }
    }
}

/// The decision and the JSON Patch that applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    /// What was decided.
    pub outcome: Outcome,
    /// The caches the Pod uses.
    pub caches: Vec<CacheId>,
    /// RFC 6902 operations (empty: no change).
    pub patch: Vec<Value>,
    /// Shown to whoever created the Pod (kubectl prints them).
    pub warnings: Vec<String>,
}

/// The caches Pod `pod` of namespace `ns` uses, in the order of its volumes, each once.
pub fn caches_of(pod: &Value, ns: &str, claims: &dyn Claims) -> Vec<CacheId> {
    let mut out: Vec<CacheId> = Vec::new();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = if v["csi"]["driver"].as_str() == Some(crate::csi::DRIVER_NAME) {
            v["csi"]["volumeAttributes"][ATTR_CACHE]
                .as_str()
                .map(str::to_string)
        } else if v["ephemeral"].is_object() {
            let t = &v["ephemeral"]["volumeClaimTemplate"];
            let cache = t["metadata"]["annotations"][ANNOTATION_CACHE].as_str();
            let class = t["spec"]["storageClassName"].as_str();
            match (cache, class) {
                (Some(c), Some(class)) if claims.class_is_ours(class) == Some(true) => {
                    Some(c.to_string())
                }
                _ => None,
            }
        } else if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            match claims.pvc(ns, claim) {
                Some((Some(class), Some(cache))) if claims.class_is_ours(&class) == Some(true) => {
                    Some(cache)
                }
                _ => None,
            }
        } else {
            None
        };
        // A name that is no cache name fails at the volume, with the message that says so.
        if let Some(id) = name.and_then(|n| CacheId::new(ns, &n).ok()) {
            if !out.contains(&id) {
                out.push(id);
            }
        }
    }
    out
}

/// Whether the Pod decides its node itself.
fn places_itself(pod: &Value) -> bool {
    let spec = &pod["spec"];
    spec["nodeSelector"]
        .as_object()
        .is_some_and(|m| !m.is_empty())
        || !spec["affinity"]["nodeAffinity"].is_null()
        || spec["nodeName"].as_str().is_some_and(|n| !n.is_empty())
}

/// JSON Pointer escaping of one path segment (RFC 6901).
fn pointer_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// The decision for Pod `pod` created in namespace `ns`.
pub fn mutate(pod: &Value, ns: &str, claims: &dyn Claims) -> Mutation {
    let mut m = Mutation {
        outcome: Outcome::NoCache,
        caches: caches_of(pod, ns, claims),
        patch: Vec::new(),
        warnings: Vec::new(),
    };
    if m.caches.is_empty() {
        return m;
    }
    let asked = pod["metadata"]["annotations"][ANNOTATION_PLACEMENT]
        .as_str()
        .unwrap_or("preferred");
    let mut required = match asked {
        "off" => {
            m.outcome = Outcome::OptedOut;
            return m;
        }
        "required" => true,
        "preferred" => false,
        other => {
            m.warnings.push(format!(
                "jobcachefs: {ANNOTATION_PLACEMENT}: {other:?} is not off, preferred or required: preferring nodes warm for its caches"
            ));
            false
        }
    };
    if places_itself(pod) {
        m.outcome = Outcome::OwnPlacement;
        return m;
    }
    let keys: Vec<String> = m.caches.iter().map(label_key).collect();
    if required {
        if let Some((id, _)) = m
            .caches
            .iter()
            .zip(&keys)
            .find(|(_, k)| claims.any_node_has(k) == Some(false))
        {
            m.warnings.push(format!(
                "jobcachefs: no node is warm for cache {id} yet: preferring warm nodes instead of requiring them, so that the Pod can be scheduled"
            ));
            required = false;
        }
    }
    let affinity = if required {
        // One term with every cache: a node must be warm for all of them.
        json!({"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
            "matchExpressions": keys.iter().map(|k| json!({"key": k, "operator": "Exists"})).collect::<Vec<_>>()
        }]}})
    } else {
        json!({"preferredDuringSchedulingIgnoredDuringExecution": keys.iter().map(|k| json!({
            "weight": WEIGHT,
            "preference": {"matchExpressions": [{"key": k, "operator": "Exists"}]}
        })).collect::<Vec<_>>()})
    };
    m.outcome = if required {
        Outcome::Required
    } else {
        Outcome::Preferred
    };
    if pod["spec"]["affinity"].is_object() {
        m.patch
            .push(json!({"op": "add", "path": "/spec/affinity/nodeAffinity", "value": affinity}));
    } else {
        m.patch.push(
            json!({"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": affinity}}),
        );
    }
    let placed = format!(
        "{} {}",
        m.outcome.as_str(),
        m.caches
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    if pod["metadata"]["annotations"].is_object() {
        m.patch.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_segment(ANNOTATION_PLACED)), "value": placed}));
    } else {
        m.patch.push(json!({"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION_PLACED: placed}}));
    }
    m
}

/// What one review came to, for the log line.
#[derive(Debug, Clone)]
pub struct Answered {
    /// The review's uid.
    pub uid: String,
    /// The Pod, `namespace/name` (or its generateName).
    pub pod: String,
    /// The decision (`None`: the review could not be read).
    pub mutation: Option<Mutation>,
    /// Why the review could not be read.
    pub error: Option<String>,
}

/// The AdmissionReview answer to request body `body`: always allowed; with a patch when the
/// Pod is placed. A body that is no AdmissionReview of a Pod gets an allowed answer (with its
/// uid when that much can be read) and no patch.
pub fn answer(body: &[u8], claims: &dyn Claims) -> (Value, Answered) {
    let review: Result<Value, String> = serde_json::from_slice(body).map_err(|e| e.to_string());
    let request = review.as_ref().ok().map(|r| &r["request"]);
    let uid = request
        .and_then(|r| r["uid"].as_str())
        .unwrap_or_default()
        .to_string();
    let mut done = Answered {
        uid: uid.clone(),
        pod: String::new(),
        mutation: None,
        error: None,
    };
    let mut response = json!({"uid": uid, "allowed": true});
    let checked = match (&review, request) {
        (Err(e), _) => Err(format!("the body is not JSON: {e}")),
        (Ok(_), Some(_)) if uid.is_empty() => Err("the review has no request.uid".to_string()),
        (Ok(_), Some(r)) if r["kind"]["kind"] != "Pod" || !r["object"].is_object() => Err(format!(
            "not a Pod but {}: check the webhook's rules",
            r["kind"]["kind"]
        )),
        (Ok(_), Some(r)) => Ok(r),
        (Ok(_), None) => Err("no request in the review".to_string()),
    };
    match checked {
        Err(e) => done.error = Some(e),
        Ok(r) if r["operation"] != "CREATE" => {
            done.mutation = Some(Mutation {
                outcome: Outcome::NoCache,
                caches: Vec::new(),
                patch: Vec::new(),
                warnings: Vec::new(),
            })
        }
        Ok(r) => {
            let pod = &r["object"];
            let ns = r["namespace"]
                .as_str()
                .or(pod["metadata"]["namespace"].as_str())
                .unwrap_or("default");
            let name = pod["metadata"]["name"]
                .as_str()
                .or(pod["metadata"]["generateName"].as_str())
                .unwrap_or_default();
            done.pod = format!("{ns}/{name}");
            let m = mutate(pod, ns, claims);
            if !m.patch.is_empty() {
                let patch = serde_json::to_vec(&m.patch).expect("plain data serializes");
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            }
            if !m.warnings.is_empty() {
                response["warnings"] = json!(m.warnings);
            }
            done.mutation = Some(m);
        }
    }
    (
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
        done,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims of a cluster with the classes `jobcache` (ours) and `standard` (not), the PVCs
    /// `m2` (ours, cache maven) and `other` (standard), and nodes warm for ci/maven only.
    struct Fake;
    impl Claims for Fake {
        fn class_is_ours(&self, class: &str) -> Option<bool> {
            match class {
                "jobcache" => Some(true),
                "standard" => Some(false),
                _ => None,
            }
        }
        fn pvc(&self, _ns: &str, name: &str) -> Option<(Option<String>, Option<String>)> {
            match name {
                "m2" => Some((Some("jobcache".into()), Some("maven".into()))),
                "other" => Some((Some("standard".into()), Some("maven".into()))),
                _ => None,
            }
        }
        fn any_node_has(&self, key: &str) -> Option<bool> {
            Some(key == "cache.jobcachefs.io/ci.maven")
        }
    }

    fn inline(cache: &str) -> Value {
        json!({"name": "c", "csi": {"driver": "csi.jobcachefs.io", "volumeAttributes": {"cache": cache}}})
    }

    fn pod(volumes: Value) -> Value {
        json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [], "volumes": volumes}})
    }

    fn preferred_keys(m: &Mutation) -> Vec<String> {
        let v = &m.patch[0]["value"];
        let a = if v["nodeAffinity"].is_object() {
            &v["nodeAffinity"]
        } else {
            v
        };
        a["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                t["preference"]["matchExpressions"][0]["key"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn every_volume_shape_names_its_cache() {
        let p = pod(json!([
            inline("npm"),
            {"name": "e", "ephemeral": {"volumeClaimTemplate": {
                "metadata": {"annotations": {"jobcachefs.io/cache": "gradle"}},
                "spec": {"storageClassName": "jobcache"}}}},
            {"name": "e2", "ephemeral": {"volumeClaimTemplate": {
                "metadata": {"annotations": {"jobcachefs.io/cache": "x"}},
                "spec": {"storageClassName": "standard"}}}},
            {"name": "p", "persistentVolumeClaim": {"claimName": "m2"}},
            {"name": "q", "persistentVolumeClaim": {"claimName": "other"}},
            {"name": "r", "persistentVolumeClaim": {"claimName": "missing"}},
            {"name": "d", "emptyDir": {}},
            inline("npm"),
            inline("Not_A_Name"),
        ]));
        let got: Vec<String> = caches_of(&p, "ci", &Fake)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(got, ["ci/npm", "ci/gradle", "ci/maven"]);
    }

    #[test]
    fn a_cache_pod_gets_preferred_terms_and_others_nothing() {
        let m = mutate(&pod(json!([inline("maven"), inline("npm")])), "ci", &Fake);
        assert_eq!(m.outcome, Outcome::Preferred);
        assert_eq!(
            preferred_keys(&m),
            ["cache.jobcachefs.io/ci.maven", "cache.jobcachefs.io/ci.npm"]
        );
        assert_eq!(m.patch[0]["path"], "/spec/affinity");
        assert_eq!(m.patch[1]["path"], "/metadata/annotations");
        let none = mutate(&pod(json!([{"name": "d", "emptyDir": {}}])), "ci", &Fake);
        assert_eq!((none.outcome, none.patch.len()), (Outcome::NoCache, 0));
    }

    #[test]
    fn own_placement_and_opt_out_are_left_alone() {
        let mut p = pod(json!([inline("maven")]));
        p["spec"]["nodeSelector"] = json!({"pool": "big"});
        assert_eq!(mutate(&p, "ci", &Fake).outcome, Outcome::OwnPlacement);
        let mut p = pod(json!([inline("maven")]));
        p["spec"]["affinity"] = json!({"nodeAffinity": {}});
        assert_eq!(mutate(&p, "ci", &Fake).outcome, Outcome::OwnPlacement);
        let mut p = pod(json!([inline("maven")]));
        p["metadata"]["annotations"] = json!({ANNOTATION_PLACEMENT: "off"});
        let m = mutate(&p, "ci", &Fake);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::OptedOut, 0));
        // Pod anti-affinity of its own is kept: the node affinity goes beside it.
        let mut p = pod(json!([inline("maven")]));
        p["spec"]["affinity"] = json!({"podAntiAffinity": {}});
        p["metadata"]["annotations"] = json!({"team": "a"});
        let m = mutate(&p, "ci", &Fake);
        assert_eq!(m.patch[0]["path"], "/spec/affinity/nodeAffinity");
        assert_eq!(
            m.patch[1]["path"],
            "/metadata/annotations/jobcachefs.io~1placed"
        );
    }

    #[test]
    fn required_only_where_some_node_is_warm() {
        let mut p = pod(json!([inline("maven")]));
        p["metadata"]["annotations"] = json!({ANNOTATION_PLACEMENT: "required"});
        let m = mutate(&p, "ci", &Fake);
        assert_eq!(m.outcome, Outcome::Required);
        let terms = &m.patch[0]["value"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        assert_eq!(
            terms[0]["matchExpressions"][0]["key"],
            "cache.jobcachefs.io/ci.maven"
        );
        // npm is warm nowhere: preferred, with a warning, never a stranded Pod.
        let mut p = pod(json!([inline("maven"), inline("npm")]));
        p["metadata"]["annotations"] = json!({ANNOTATION_PLACEMENT: "required"});
        let m = mutate(&p, "ci", &Fake);
        assert_eq!(m.outcome, Outcome::Preferred);
        assert!(m.warnings[0].contains("ci/npm"), "{:?}", m.warnings);
        // A value that means nothing: preferred, and said so.
        let mut p = pod(json!([inline("maven")]));
        p["metadata"]["annotations"] = json!({ANNOTATION_PLACEMENT: "always"});
        let m = mutate(&p, "ci", &Fake);
        assert_eq!(m.outcome, Outcome::Preferred);
        assert!(m.warnings[0].contains("\"always\""));
    }

    #[test]
    fn malformed_reviews_are_allowed_unchanged() {
        for body in [
            &b"not json"[..],
            br#"{"request": {"kind": {"kind": "Pod"}}}"#,
            br#"{"request": {"uid": "u1", "kind": {"kind": "Secret"}, "object": {}}}"#,
            br#"[]"#,
        ] {
            let (v, done) = answer(body, &Fake);
            assert_eq!(v["response"]["allowed"], true);
            assert!(v["response"]["patch"].is_null());
            assert!(done.error.is_some(), "{}", String::from_utf8_lossy(body));
        }
        let review = json!({"request": {"uid": "u2", "kind": {"kind": "Pod"}, "operation": "CREATE",
            "namespace": "ci", "object": pod(json!([inline("maven")]))}});
        let (v, done) = answer(review.to_string().as_bytes(), &Fake);
        assert_eq!(v["response"]["uid"], "u2");
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        assert_eq!(done.pod, "ci/p");
    }
}
