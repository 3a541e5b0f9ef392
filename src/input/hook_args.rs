//! The hook's inputs, checked once for every caller: what local-path-provisioner passes
//! (`-p PATH -s BYTES -m MODE -a create|delete`, and `VOL_DIR`, `VOL_SIZE_BYTES`, `VOL_MODE`,
//! `VOL_USER`, `VOL_GROUP`, `VOL_PERM` in the environment) into a [`HookRequest`]. Pure: the
//! caller reads the environment and the helper pod's `/etc/passwd` and `/etc/group` and passes
//! them in ([`Accounts`]).

use crate::error::{Error, Result};
use crate::input::quantity::parse_size;
use crate::state::records::RootOwner;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The environment variables of the provisioner's contract, in the order it documents them.
pub const ENV_VARS: [&str; 6] = [
    "VOL_DIR",
    "VOL_SIZE_BYTES",
    "VOL_MODE",
    "VOL_USER",
    "VOL_GROUP",
    "VOL_PERM",
];

/// The [`ENV_VARS`] that `lookup` finds, by name.
pub fn env_from(lookup: impl Fn(&str) -> Option<String>) -> BTreeMap<String, String> {
    ENV_VARS
        .iter()
        .filter_map(|k| lookup(k).map(|v| (k.to_string(), v)))
        .collect()
}

/// The root of a hook volume when `VOL_USER`/`VOL_GROUP`/`VOL_PERM` are not set: root-owned and
/// world-writable, as the provisioner's stock `mkdir -m 0777` makes it, so that build pods
/// running as any user can write.
pub const DEFAULT_ROOT: RootOwner = RootOwner {
    uid: 0,
    gid: 0,
    mode: 0o777,
};

/// `-a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Setup.
    Create,
    /// Teardown.
    Delete,
}

/// The hook's inputs as given: command-line values and environment values.
#[derive(Debug, Clone, Default)]
pub struct RawInputs {
    /// `-p`.
    pub path: Option<String>,
    /// `-s`.
    pub size: Option<String>,
    /// `-m`.
    pub mode: Option<String>,
    /// Each `-a` given: the provisioner and deploy/'s scripts may both pass it, so it may come
    /// twice if both agree.
    pub actions: Vec<String>,
    /// The `VOL_*` environment, by name.
    pub env: BTreeMap<String, String>,
}

/// The hook's request after checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRequest {
    /// The volume's folder.
    pub path: PathBuf,
    /// Requested bytes.
    pub size: u64,
    /// Setup or teardown.
    pub action: Action,
    /// Owner and mode of the volume's root.
    pub root: RootOwner,
    /// Where arguments and environment disagreed (the arguments won).
    pub warnings: Vec<String>,
}

/// Takes the argument if given, else the environment variable; says so when both are given and
/// disagree.
fn pick(
    flag: &str,
    arg: &Option<String>,
    var: &str,
    env: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> Option<String> {
    let from_env = env.get(var).filter(|v| !v.is_empty());
    match (arg.as_ref().filter(|v| !v.is_empty()), from_env) {
        (Some(a), Some(e)) if a != e => {
            warnings.push(format!(
                "{flag} {a:?} and {var}={e:?} disagree: using {flag} {a:?}"
            ));
            Some(a.clone())
        }
        (Some(a), _) => Some(a.clone()),
        (None, Some(e)) => Some(e.clone()),
        (None, None) => None,
    }
}

/// The helper pod's users and groups (`/etc/passwd`, `/etc/group`), to resolve the names a
/// class's `userPattern`/`groupPattern` may put into `VOL_USER`/`VOL_GROUP`.
#[derive(Debug, Clone, Default)]
pub struct Accounts {
    users: BTreeMap<String, u32>,
    groups: BTreeMap<String, u32>,
}

impl Accounts {
    /// From the text of `/etc/passwd` and `/etc/group` (name:x:id:...; malformed lines skipped).
    pub fn parse(passwd: &str, group: &str) -> Accounts {
        let table = |text: &str| {
            text.lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next().filter(|n| !n.is_empty() && !n.starts_with('#'))?;
                    let id = f.nth(1)?.trim().parse().ok()?;
                    Some((name.to_string(), id))
                })
                .collect()
        };
        Accounts {
            users: table(passwd),
            groups: table(group),
        }
    }

    /// This machine's (the helper pod's) accounts; an unreadable file counts as empty.
    pub fn from_system() -> Accounts {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Accounts::parse(&read("/etc/passwd"), &read("/etc/group"))
    }
}

/// `VOL_USER`/`VOL_GROUP` → an id. The provisioner passes whatever the class's
/// `userPattern`/`groupPattern` renders to: a number, a name, or anything else. A number is
/// taken as is, a name is resolved in `table`; anything unresolvable is ignored (root keeps the
/// folder) with a warning that says so, because refusing it would fail every setup of the class.
fn owner_id(
    var: &str,
    value: &str,
    table: &BTreeMap<String, u32>,
    file: &str,
    warnings: &mut Vec<String>,
) -> Option<u32> {
    let value = value.trim();
    if let Ok(id) = value.parse() {
        return Some(id);
    }
    if let Some(id) = table.get(value) {
        return Some(*id);
    }
    warnings.push(format!(
        "{var}={value:?} is neither a number nor a name in the helper pod's {file}: ignored, the volume's root stays owned by 0; give the class's pattern a numeric id, or a name the helper image knows"
    ));
    None
}

/// Checks the inputs (pure): arguments win over the environment; owner names are resolved in
/// `accounts`.
pub fn resolve(raw: &RawInputs, accounts: &Accounts) -> Result<HookRequest> {
    if raw.actions.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::invalid(format!(
            "-a is given as {}: a hook run is either -a create or -a delete",
            raw.actions.join(" and ")
        )));
    }
    let mut warnings = Vec::new();
    let env = &raw.env;
    let path = pick("-p", &raw.path, "VOL_DIR", env, &mut warnings).ok_or_else(|| {
        Error::invalid(
            "no volume path: pass -p PATH (or set VOL_DIR), as local-path-provisioner does",
        )
    })?;
    let action = match raw.actions.first().map(String::as_str) {
        Some("create") => Action::Create,
        Some("delete") => Action::Delete,
        Some(other) => {
            return Err(Error::invalid(format!(
                "-a {other:?} is not an action: use -a create (setup) or -a delete (teardown)"
            )))
        }
        None => {
            return Err(Error::invalid(
                "no action: pass -a create (setup) or -a delete (teardown)",
            ))
        }
    };
    let mode = pick("-m", &raw.mode, "VOL_MODE", env, &mut warnings)
        .unwrap_or_else(|| "Filesystem".to_string());
    match mode.as_str() {
        "Filesystem" => {}
        "Block" => {
            return Err(Error::invalid(format!(
                "volume {path}: volumeMode Block is not supported: jobcachefs provides Filesystem volumes; set volumeMode: Filesystem on the PVC"
            )))
        }
        other => {
            return Err(Error::invalid(format!(
                "-m {other:?} is not a volume mode: the provisioner passes Filesystem or Block"
            )))
        }
    }
    let size =
        match pick("-s", &raw.size, "VOL_SIZE_BYTES", env, &mut warnings) {
            // Teardown needs no size: what was made is in the volume's record.
            _ if action == Action::Delete => 0,
            Some(s) => parse_size("-s (VOL_SIZE_BYTES)", &s)?,
            None => return Err(Error::invalid(
                "no size: pass -s BYTES (or set VOL_SIZE_BYTES), as local-path-provisioner does",
            )),
        };
    let var = |k: &str| env.get(k).filter(|v| !v.is_empty());
    let mut root = DEFAULT_ROOT;
    if let Some(u) = var("VOL_USER") {
        let users = &accounts.users;
        if let Some(uid) = owner_id("VOL_USER", u, users, "/etc/passwd", &mut warnings) {
            root.uid = uid;
        }
    }
    if let Some(g) = var("VOL_GROUP") {
        let groups = &accounts.groups;
        if let Some(gid) = owner_id("VOL_GROUP", g, groups, "/etc/group", &mut warnings) {
            root.gid = gid;
        }
    }
    if let Some(p) = var("VOL_PERM") {
        let digits = p.trim_start_matches("0o");
        root.mode = u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "VOL_PERM={p:?} is not an octal mode: use e.g. 0775"
                ))
            })?;
    }
    Ok(HookRequest {
        path: PathBuf::from(path),
        size,
        action,
        root,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn raw(args: [Option<&str>; 4], env: &[(&str, &str)]) -> RawInputs {
        RawInputs {
            path: args[0].map(str::to_string),
            size: args[1].map(str::to_string),
            mode: args[2].map(str::to_string),
            actions: args[3].map(str::to_string).into_iter().collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn args_win_and_say_so() {
        let r = resolve(
            &raw(
                [
                    Some("/n/a_b_c"),
                    Some("1024"),
                    Some("Filesystem"),
                    Some("create"),
                ],
                &[("VOL_DIR", "/n/x_y_z"), ("VOL_SIZE_BYTES", "1024")],
            ),
            &Accounts::default(),
        )
        .unwrap();
        assert_eq!(r.path, PathBuf::from("/n/a_b_c"));
        assert_eq!(r.size, 1024);
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("VOL_DIR"), "{:?}", r.warnings);
        assert_eq!(r.root, DEFAULT_ROOT);
    }

    #[test]
    fn env_fills_in() {
        let r = resolve(
            &raw(
                [None, None, None, Some("create")],
                &[
                    ("VOL_DIR", "/n/a_b_c"),
                    ("VOL_SIZE_BYTES", "2147483648"),
                    ("VOL_MODE", "Filesystem"),
                    ("VOL_USER", "1000"),
                    ("VOL_GROUP", "2000"),
                    ("VOL_PERM", "0750"),
                ],
            ),
            &Accounts::default(),
        )
        .unwrap();
        assert_eq!(r.size, 2 << 30);
        assert_eq!(
            r.root,
            RootOwner {
                uid: 1000,
                gid: 2000,
                mode: 0o750
            }
        );
        assert!(r.warnings.is_empty());
        // On delete the provisioner leaves VOL_USER & co empty.
        let r = resolve(
            &raw(
                [
                    Some("/n/a_b_c"),
                    Some("0"),
                    Some("Filesystem"),
                    Some("delete"),
                ],
                &[("VOL_USER", ""), ("VOL_PERM", "")],
            ),
            &Accounts::default(),
        )
        .unwrap();
        assert_eq!(r.action, Action::Delete);
    }

    #[test]
    fn bad_inputs_name_the_value() {
        for (args, env, needle) in [
            ([None, Some("1"), None, Some("create")], &[][..], "-p PATH"),
            (
                [Some("/n/a_b_c"), Some("1"), Some("Block"), Some("create")],
                &[][..],
                "Block is not supported",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                &[("VOL_MODE", "Block")][..],
                "Block is not supported",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), Some("Raw"), Some("create")],
                &[][..],
                "\"Raw\"",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("mount")],
                &[][..],
                "\"mount\"",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, None],
                &[][..],
                "-a create",
            ),
            (
                [Some("/n/a_b_c"), None, None, Some("create")],
                &[][..],
                "-s BYTES",
            ),
            (
                [Some("/n/a_b_c"), Some("ten"), None, Some("create")],
                &[][..],
                "\"ten\"",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                &[("VOL_PERM", "0999")][..],
                "VOL_PERM",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                &[("VOL_PERM", "17777")][..],
                "VOL_PERM",
            ),
        ] {
            let e = resolve(&raw(args, env), &Accounts::default()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn owner_names_resolve_or_are_ignored_with_a_warning() {
        let accounts = Accounts::parse(
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nbuilder:x:1001:1001::/home/builder:/bin/sh\n",
            "root:x:0:\nci:x:2002:builder\n",
        );
        let req = |user: &str, group: &str| {
            resolve(
                &raw(
                    [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                    &[("VOL_USER", user), ("VOL_GROUP", group)],
                ),
                &accounts,
            )
            .unwrap()
        };
        let r = req("builder", "ci");
        assert_eq!((r.root.uid, r.root.gid), (1001, 2002));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let r = req("1000", "ci");
        assert_eq!((r.root.uid, r.root.gid), (1000, 2002));
        // What a userPattern such as "{{ .PVC.Annotations.owner }}" may render to.
        let r = req("bob", "team-{{x}}");
        assert_eq!((r.root.uid, r.root.gid), (0, 0));
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        assert!(
            r.warnings[0].contains("VOL_USER=\"bob\"")
                && r.warnings[0].contains("/etc/passwd")
                && r.warnings[0].contains("owned by 0"),
            "{}",
            r.warnings[0]
        );
        assert!(
            r.warnings[1].contains("VOL_GROUP=\"team-{{x}}\""),
            "{}",
            r.warnings[1]
        );
    }

    #[test]
    fn actions_must_agree() {
        let mut r = raw([Some("/n/a_b_c"), Some("1"), None, Some("create")], &[]);
        r.actions.push("create".into());
        assert_eq!(
            resolve(&r, &Accounts::default()).unwrap().action,
            Action::Create
        );
        r.actions.push("delete".into());
        assert_eq!(
            resolve(&r, &Accounts::default()).unwrap_err().to_string(),
            "-a is given as create and create and delete: a hook run is either -a create or -a delete"
        );
    }

    #[test]
    fn only_the_contract_s_variables_are_read() {
        let env = env_from(|k| (k != "VOL_MODE").then(|| format!("{k}!")));
        assert_eq!(env.len(), 5);
        assert_eq!(env["VOL_PERM"], "VOL_PERM!");
        assert!(!env.contains_key("VOL_MODE"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

    /// Modest case counts; nothing written into the source tree on failure.
    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// A value as the provisioner or a class's patterns might pass it, or anything.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "(create|delete|Filesystem|Block|/n/a_b_c|1|0|1Gi|0775|0o755|root|builder|\\+7|99999999999)",
            "[0-9a-zA-Z+/_. -]{0,12}",
            any::<String>(),
        ]
    }

    fn raw_inputs() -> impl Strategy<Value = RawInputs> {
        let key = prop_oneof![
            prop::sample::select(&ENV_VARS[..]).prop_map(String::from),
            "[A-Z_]{1,8}"
        ];
        (
            prop::option::of(value()),
            prop::option::of(value()),
            prop::option::of(value()),
            prop::collection::vec(value(), 0..3),
            prop::collection::btree_map(key, value(), 0..8),
        )
            .prop_map(|(path, size, mode, actions, env)| RawInputs {
                path,
                size,
                mode,
                actions,
                env,
            })
    }

    /// `/etc/passwd`-like text: good lines, comments, short lines, junk.
    fn table() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec(
                "(#?[a-z]{0,6}(:x?(:[0-9+-]{0,11}(:[a-z/]{0,5}){0,4})?)?|.{0,20})",
                0..6
            )
            .prop_map(|l| l.join("\n")),
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(config(512))]

        /// Any arguments, environment and account files: a request or an InvalidInput error,
        /// never a panic; what is accepted honours the contract.
        #[test]
        fn any_inputs_resolve_or_are_refused(
            raw in raw_inputs(),
            passwd in table(),
            group in table(),
        ) {
            let accounts = Accounts::parse(&passwd, &group);
            match resolve(&raw, &accounts) {
                Ok(req) => {
                    prop_assert!(req.root.mode <= 0o7777);
                    prop_assert!(raw.actions.iter().all(|a| a == raw.actions[0].as_str()));
                    match req.action {
                        Action::Create => prop_assert!(req.size > 0),
                        Action::Delete => prop_assert_eq!(req.size, 0),
                    }
                    // An argument given wins over the environment.
                    if let Some(p) = raw.path.as_ref().filter(|p| !p.is_empty()) {
                        prop_assert_eq!(req.path, PathBuf::from(p));
                    }
                }
                Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidInput),
            }
        }
    }
}
