//! Which PVC a volume path belongs to. local-path-provisioner passes the hook nothing but the
//! path, so the PV name, namespace and PVC name are read back from the two folder layouts it can
//! make (pure; no I/O):
//!
//! - the default `<node path>/<pvName>_<namespace>_<pvcName>`: unambiguous, since none of the
//!   three may contain `_`;
//! - a `pathPattern` starting `{{ .PVC.Namespace }}/{{ .PVC.Name }}/`: `<node path>/<ns>/<pvc>/…`.
//!   Where the node path ends is not in the path itself, so this form needs the node paths of the
//!   provisioner's `config.json` in the `[kubernetes] node_paths` config key.

use crate::error::{Error, Result};
use crate::input::names::{validate_label, validate_subdomain};
use std::path::{Component, Path, PathBuf};

/// The Kubernetes identity of a volume, as far as its path tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeIdentity {
    /// The PV's name; unknown for a `pathPattern` that does not contain it.
    pub pv: Option<String>,
    /// The PVC's namespace (also the cache's namespace).
    pub namespace: String,
    /// The PVC's name.
    pub pvc: String,
}

/// Parses `<pv>_<namespace>_<pvc>`, the provisioner's default folder name.
fn parse_default_folder(folder: &str) -> Option<VolumeIdentity> {
    let parts: Vec<&str> = folder.split('_').collect();
    if parts.len() != 3 {
        return None;
    }
    Some(VolumeIdentity {
        pv: Some(parts[0].to_string()),
        namespace: parts[1].to_string(),
        pvc: parts[2].to_string(),
    })
}

fn validate(id: VolumeIdentity, path: &Path) -> Result<VolumeIdentity> {
    let shown = path.display();
    if let Some(pv) = &id.pv {
        validate_subdomain(&format!("PV name in volume path {shown}"), pv)?;
    }
    validate_label(&format!("namespace in volume path {shown}"), &id.namespace)?;
    validate_subdomain(&format!("PVC name in volume path {shown}"), &id.pvc)?;
    Ok(id)
}

/// Reads the volume's identity from `path`. `node_paths` are the provisioner's node paths (may
/// be empty: then only the default folder form is understood).
pub(crate) fn parse_volume_path(path: &Path, node_paths: &[PathBuf]) -> Result<VolumeIdentity> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(Error::invalid(format!(
            "volume path {shown:?} is not absolute: the provisioner passes an absolute path with -p"
        )));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(Error::invalid(format!(
            "volume path {shown:?} contains '.' or '..': give the path exactly as the provisioner made it"
        )));
    }
    let base = node_paths
        .iter()
        .filter(|b| path.starts_with(b) && path != b.as_path())
        .max_by_key(|b| b.components().count());
    let rel: Vec<String> = match base {
        Some(b) => path
            .strip_prefix(b)
            .expect("checked by starts_with")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect(),
        None if node_paths.is_empty() => {
            let last = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return match parse_default_folder(&last) {
                Some(id) => validate(id, path),
                None => Err(Error::invalid(format!(
                    "volume path {shown:?} does not end in <pv>_<namespace>_<pvc>: for a pathPattern, list the provisioner's node paths in the `[kubernetes] node_paths` config key"
                ))),
            };
        }
        None => {
            return Err(Error::invalid(format!(
                "volume path {shown:?} is not under a node path of the config ({}): add the provisioner's node path to `[kubernetes] node_paths`",
                node_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    match rel.as_slice() {
        [folder] => match parse_default_folder(folder) {
            Some(id) => validate(id, path),
            None => Err(Error::invalid(format!(
                "volume folder {folder:?} in {shown:?} is not <pv>_<namespace>_<pvc>, and a pathPattern must start with {{{{ .PVC.Namespace }}}}/{{{{ .PVC.Name }}}}/"
            ))),
        },
        [ns, pvc, rest @ ..] => {
            // `{{ .PVC.Namespace }}/{{ .PVC.Name }}/…`: the PV name is there only if the rest of
            // the pattern is `{{ .PVName }}`-like; we take it when it looks like one.
            let pv = match rest {
                [one] if one.starts_with("pvc-") => Some(one.clone()),
                _ => None,
            };
            validate(
                VolumeIdentity {
                    pv,
                    namespace: ns.clone(),
                    pvc: pvc.clone(),
                },
                path,
            )
        }
        [] => unreachable!("the path is strictly below the base"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pv: Option<&str>, ns: &str, pvc: &str) -> VolumeIdentity {
        VolumeIdentity {
            pv: pv.map(str::to_string),
            namespace: ns.to_string(),
            pvc: pvc.to_string(),
        }
    }

    const PV: &str = "pvc-0b7a3c0e-5b2f-4a55-9d2c-1b1e3f7e9a10";

    #[test]
    fn default_folder_without_and_with_node_paths() {
        let p = PathBuf::from(format!("/var/lib/jcv/{PV}_ci_build-cache"));
        let want = id(Some(PV), "ci", "build-cache");
        assert_eq!(parse_volume_path(&p, &[]).unwrap(), want);
        assert_eq!(
            parse_volume_path(&p, &[PathBuf::from("/var/lib/jcv")]).unwrap(),
            want
        );
    }

    #[test]
    fn path_pattern_forms() {
        let nodes = [PathBuf::from("/srv/a"), PathBuf::from("/srv/a/deeper")];
        assert_eq!(
            parse_volume_path(&PathBuf::from(format!("/srv/a/ci/job.cache/{PV}")), &nodes).unwrap(),
            id(Some(PV), "ci", "job.cache")
        );
        assert_eq!(
            parse_volume_path(&PathBuf::from("/srv/a/ci/cache/x/y"), &nodes).unwrap(),
            id(None, "ci", "cache")
        );
        // The longest node path wins.
        assert_eq!(
            parse_volume_path(&PathBuf::from("/srv/a/deeper/ns1/p1/v"), &nodes).unwrap(),
            id(None, "ns1", "p1")
        );
    }

    #[test]
    fn rejects_malformed_paths_naming_them() {
        let nodes = [PathBuf::from("/srv/a")];
        for (bad, nodes, needle) in [
            ("relative/pv_ns_pvc", &[][..], "not absolute"),
            ("/srv/a/../etc/pv_ns_pvc", &nodes[..], "'..'"),
            ("/srv/a/pv_ns", &nodes[..], "is not <pv>_<namespace>_<pvc>"),
            (
                "/srv/a/pv_ns_pvc_x",
                &nodes[..],
                "is not <pv>_<namespace>_<pvc>",
            ),
            ("/srv/a", &nodes[..], "not under a node path"),
            ("/other/pv_ns_pvc", &nodes[..], "not under a node path"),
            ("/srv/a/pv__pvc", &nodes[..], "namespace"),
            ("/srv/a/pv_NS_pvc", &nodes[..], "namespace"),
            ("/srv/a/pv_ns_PVC", &nodes[..], "PVC name"),
            ("/x/just-a-dir", &[][..], "node_paths"),
            ("/srv/a/ns_1/p/v", &nodes[..], "namespace"),
        ] {
            let err = parse_volume_path(Path::new(bad), nodes).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput, "{bad}");
            assert!(err.to_string().contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn subdomains() {
        for ok in ["a", "a.b", "pvc-1", "x".repeat(253).as_str()] {
            validate_subdomain("n", ok).unwrap();
        }
        for bad in ["", ".a", "a.", "a..b", "-a", "A", "a_b", &"x".repeat(254)] {
            assert!(validate_subdomain("n", bad).is_err(), "{bad}");
        }
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

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    fn subdomain() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
    }

    /// A node path: absolute, not `/`, components that are not `.` or `..`.
    fn node_path() -> impl Strategy<Value = PathBuf> {
        prop::collection::vec("[a-zA-Z0-9_.-]{1,8}", 1..4).prop_filter_map("no . or ..", |c| {
            (!c.iter().any(|x| x == "." || x == ".."))
                .then(|| PathBuf::from(format!("/{}", c.join("/"))))
        })
    }

    /// Paths made of the characters that matter here: separators, '_', '.', upper case.
    fn hostile_path() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[/a-zA-Z_.-]{0,40}",
            "(/(srv|a|b|\\.|\\.\\.|[a-z]{1,3}_[a-z]{0,3}_[a-z.-]{0,5}|pvc-[a-z0-9]{1,4})){0,6}/?",
        ]
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Never panics; what is accepted consists of valid names that are really in the path.
        #[test]
        fn any_path_parses_or_is_refused(
            p in hostile_path(),
            nodes in prop::collection::vec(prop_oneof![
                node_path(),
                Just(PathBuf::from("/srv")),
                Just(PathBuf::from("/srv/a")),
            ], 0..3),
        ) {
            let path = Path::new(&p);
            match parse_volume_path(path, &nodes) {
                Ok(id) => {
                    prop_assert!(validate_label("ns", &id.namespace).is_ok());
                    prop_assert!(validate_subdomain("pvc", &id.pvc).is_ok());
                    let parts: Vec<String> = path
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    let folder = id
                        .pv
                        .as_ref()
                        .map(|pv| format!("{pv}_{}_{}", id.namespace, id.pvc));
                    let default_form = folder.as_ref() == parts.last();
                    let pattern_form = parts
                        .windows(2)
                        .any(|w| w[0] == id.namespace && w[1] == id.pvc);
                    prop_assert!(default_form || pattern_form, "{p:?} → {id:?}");
                }
                Err(e) => prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidInput),
            }
        }

        /// `<node path>/<pv>_<ns>_<pvc>` parses back to its parts, with or without the node
        /// path in the config.
        #[test]
        fn default_folders_round_trip(
            base in node_path(),
            pv in subdomain(),
            ns in label(),
            pvc in subdomain(),
        ) {
            let p = base.join(format!("{pv}_{ns}_{pvc}"));
            let want = VolumeIdentity { pv: Some(pv), namespace: ns, pvc };
            prop_assert_eq!(parse_volume_path(&p, &[]).unwrap(), want.clone());
            prop_assert_eq!(parse_volume_path(&p, &[base]).unwrap(), want);
        }

        /// `<node path>/<ns>/<pvc>/<rest>` parses back to ns and pvc (and the PV when the rest is
        /// one `pvc-` folder), whatever other node paths are configured beside or above it.
        #[test]
        fn path_patterns_round_trip(
            base in node_path(),
            other in node_path(),
            ns in label(),
            pvc in subdomain(),
            rest in prop::collection::vec("[a-z0-9_.-]{1,6}", 0..3),
            pv in prop::option::of(label().prop_map(|l| format!("pvc-{l}"))),
        ) {
            let mut p = base.join(&ns).join(&pvc);
            let rest: Vec<String> = rest.into_iter().filter(|r| r != "." && r != "..").collect();
            let pv = match &pv {
                Some(pv) => {
                    p.push(pv);
                    Some(pv.clone())
                }
                None => {
                    for r in &rest {
                        p.push(r);
                    }
                    match rest.as_slice() {
                        [one] if one.starts_with("pvc-") => Some(one.clone()),
                        _ => None,
                    }
                }
            };
            // A parent of the base is also configured: the longest node path must win.
            let parent = base.parent().filter(|b| b.parent().is_some()).map(Path::to_path_buf);
            // Unless `other` happens to be a deeper node path holding this one.
            prop_assume!(
                !(p.starts_with(&other) && other.components().count() > base.components().count())
            );
            let nodes: Vec<PathBuf> = [Some(other), parent, Some(base)].into_iter().flatten().collect();
            let got = parse_volume_path(&p, &nodes).unwrap();
            prop_assert_eq!(got, VolumeIdentity { pv, namespace: ns, pvc });
        }
    }
}
