//! `jobcachefs run`: a volume for the life of one command on a plain CI runner. The decisions
//! are here and pure — which caches at which DIRs, whether CMD can be run at all, whether the
//! volume commits after CMD ended, which exit code the run returns — and the process handling
//! (CMD in its own process group, signals passed on) is in [`process`]. The engine's part (the
//! run lock, the repair of a killed run) is `engine/runs.rs`.

pub mod process;

use crate::error::{Error, Result};
use crate::input::names::CacheId;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// When a run's volume is committed into its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteBack {
    /// When CMD exited 0 (what `--write-back` alone asks for).
    OnSuccess,
    /// Whatever CMD's exit code (a failed build's downloads are kept too).
    Always,
    /// Never: a read-only use of the cache (the default, as `volume create` without
    /// `--write-back`: writing a cache back is always asked for).
    #[default]
    Never,
}

impl WriteBack {
    /// Parses `on-success`, `always` or `never`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "on-success" => Ok(WriteBack::OnSuccess),
            "always" => Ok(WriteBack::Always),
            "never" => Ok(WriteBack::Never),
            _ => Err(Error::invalid(format!(
                "--write-back {s:?} is invalid: use on-success, always or never"
            ))),
        }
    }
}

/// How CMD ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signalled(i32),
}

impl Ended {
    /// The exit code a shell reports for it: the code, or 128 + the signal.
    pub fn exit_code(self) -> u8 {
        match self {
            Ended::Exited(c) => (c & 0xff) as u8,
            Ended::Signalled(s) => (128 + s).clamp(0, 255) as u8,
        }
    }
}

/// Whether the volume commits. A run told to stop (SIGINT, SIGTERM, SIGHUP) and a CMD killed by
/// a signal never commit, whatever the policy: what the job was writing at that instant may be
/// half-written, and a cache must not keep it.
pub fn should_commit(policy: WriteBack, ended: Ended, stopped: bool) -> bool {
    if stopped {
        return false;
    }
    match (policy, ended) {
        (WriteBack::Never, _) | (_, Ended::Signalled(_)) => false,
        (WriteBack::Always, Ended::Exited(_)) => true,
        (WriteBack::OnSuccess, Ended::Exited(c)) => c == 0,
    }
}

/// Exit code when CMD cannot be found (as shells, `env` and `timeout` report it).
pub const EXIT_NOT_FOUND: u8 = 127;
/// Exit code when CMD is found but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: u8 = 126;

/// Why CMD cannot be run, with its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandProblem {
    /// [`EXIT_NOT_FOUND`] or [`EXIT_NOT_EXECUTABLE`].
    pub code: u8,
    /// For the user.
    pub message: String,
}

/// Finds CMD as `execvp` would: a name with a `/` as it is, any other in `path` (`$PATH`).
pub fn find_command(
    cmd: &OsStr,
    path: Option<&OsStr>,
) -> std::result::Result<PathBuf, CommandProblem> {
    let shown = cmd.to_string_lossy();
    if cmd.is_empty() {
        return Err(CommandProblem {
            code: EXIT_NOT_FOUND,
            message: "CMD is empty: give the command to run after --".into(),
        });
    }
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if cmd.as_encoded_bytes().contains(&b'/') {
        let p = PathBuf::from(cmd);
        return match std::fs::metadata(&p) {
            Err(_) => Err(CommandProblem {
                code: EXIT_NOT_FOUND,
                message: format!("command {shown:?} not found: check the path"),
            }),
            Ok(_) if !executable(&p) => Err(CommandProblem {
                code: EXIT_NOT_EXECUTABLE,
                message: format!(
                    "command {shown:?} is not an executable file: chmod +x it or run it through its interpreter"
                ),
            }),
            Ok(_) => Ok(p),
        };
    }
    let path = path
        .map(OsString::from)
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let p = dir.join(cmd);
        if executable(&p) {
            return Ok(p);
        }
    }
    Err(CommandProblem {
        code: EXIT_NOT_FOUND,
        message: format!("command {shown:?} not found in PATH: install it or give its path"),
    })
}

/// One cache of a run and the DIR its volume is mounted at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheAt {
    /// The cache.
    pub cache: CacheId,
    /// The volume's DIR (absolute).
    pub dir: PathBuf,
}

/// The caches of a run: `--cache NAME --dir PATH`, or several `--cache NAME:PATH`. Every DIR
/// must be absolute, and no two may be the same cache, the same DIR or one inside another.
pub fn parse_caches(namespace: &str, specs: &[String], dir: Option<&Path>) -> Result<Vec<CacheAt>> {
    let mut out: Vec<CacheAt> = Vec::new();
    for spec in specs {
        let (name, path) = match spec.split_once(':') {
            Some((n, p)) => (n, Some(PathBuf::from(p))),
            None => (spec.as_str(), None),
        };
        let cache = CacheId::new(namespace, name)?;
        let path = match (path, dir, specs.len()) {
            (Some(p), None, _) => p,
            (None, Some(d), 1) => d.to_path_buf(),
            (Some(_), Some(_), _) => {
                return Err(Error::invalid(format!(
                    "--cache {spec:?} names its DIR and --dir is given too: use one of them"
                )))
            }
            (None, Some(_), _) => {
                return Err(Error::invalid(format!(
                    "--cache {spec:?} has no DIR: with several caches give each its DIR as --cache NAME:PATH (and no --dir)"
                )))
            }
            (None, None, _) => {
                return Err(Error::invalid(format!(
                    "--cache {spec:?} has no DIR: add --dir PATH, or write --cache {name}:PATH"
                )))
            }
        };
        if !path.is_absolute() {
            return Err(Error::invalid(format!(
                "DIR {:?} of cache {name:?} is relative: give an absolute path (CMD may change its working directory)",
                path.display().to_string()
            )));
        }
        for other in &out {
            if other.cache == cache {
                return Err(Error::invalid(format!(
                    "cache {name:?} is given twice: one volume per cache"
                )));
            }
            if other.dir.starts_with(&path) || path.starts_with(&other.dir) {
                return Err(Error::invalid(format!(
                    "DIRs {:?} and {:?} overlap: give each cache its own directory, neither inside the other",
                    other.dir.display().to_string(),
                    path.display().to_string()
                )));
            }
        }
        out.push(CacheAt { cache, dir: path });
    }
    if out.is_empty() {
        return Err(Error::invalid(
            "no --cache given: add --cache NAME --dir PATH",
        ));
    }
    Ok(out)
}

/// The environment variable naming the DIR of `cache` in a run of several caches
/// (`JOBCACHEFS_DIR_MAVEN_REPO` for `maven-repo`); `JOBCACHEFS_DIR` names the first one's.
pub fn dir_env_name(cache: &CacheId) -> String {
    format!(
        "JOBCACHEFS_DIR_{}",
        cache.name.to_ascii_uppercase().replace('-', "_")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_what_the_policy_and_the_end_allow() {
        use Ended::*;
        use WriteBack::*;
        assert!(should_commit(OnSuccess, Exited(0), false));
        assert!(!should_commit(OnSuccess, Exited(1), false));
        assert!(should_commit(Always, Exited(3), false));
        assert!(!should_commit(Always, Signalled(9), false));
        assert!(!should_commit(Always, Exited(0), true));
        assert!(!should_commit(OnSuccess, Exited(0), true));
        assert!(!should_commit(Never, Exited(0), false));
        assert_eq!(WriteBack::default(), Never);
        assert_eq!(WriteBack::parse("always").unwrap(), Always);
        assert!(WriteBack::parse("yes").is_err());
    }

    #[test]
    fn exit_codes_are_the_shells() {
        assert_eq!(Ended::Exited(0).exit_code(), 0);
        assert_eq!(Ended::Exited(42).exit_code(), 42);
        assert_eq!(Ended::Signalled(15).exit_code(), 143);
        assert_eq!(Ended::Signalled(9).exit_code(), 137);
    }

    #[test]
    fn finds_commands_as_execvp_does() {
        assert_eq!(
            find_command(OsStr::new("sh"), Some(OsStr::new("/nonexistent:/bin"))).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert_eq!(
            find_command(OsStr::new("no-such-cmd-x"), Some(OsStr::new("/bin")))
                .unwrap_err()
                .code,
            127
        );
        assert_eq!(
            find_command(OsStr::new("/no/such"), None).unwrap_err().code,
            127
        );
        let t = tempfile::tempdir().unwrap();
        let plain = t.path().join("plain");
        std::fs::write(&plain, "not a program").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_command(plain.as_os_str(), None).unwrap_err().code, 126);
        assert_eq!(find_command(OsStr::new(""), None).unwrap_err().code, 127);
    }

    #[test]
    fn parses_one_or_several_caches() {
        let one = parse_caches("ci", &["maven".into()], Some(Path::new("/b/m2"))).unwrap();
        assert_eq!(one[0].cache, CacheId::new("ci", "maven").unwrap());
        assert_eq!(one[0].dir, PathBuf::from("/b/m2"));
        let two = parse_caches("ci", &["a:/x/a".into(), "b:/x/b".into()], None).unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(
            dir_env_name(&CacheId::new("ci", "maven-repo").unwrap()),
            "JOBCACHEFS_DIR_MAVEN_REPO"
        );
        for (specs, dir, msg) in [
            (&["Bad"][..], Some("/x"), "cache name \"Bad\" is invalid"),
            (&["a"][..], Some("rel/x"), "is relative"),
            (&["a"][..], None, "add --dir PATH"),
            (&["a", "b"][..], Some("/x"), "as --cache NAME:PATH"),
            (&["a:/x"][..], Some("/y"), "--dir is given too"),
            (&["a:/x", "a:/y"][..], None, "given twice"),
            (&["a:/x", "b:/x/y"][..], None, "overlap"),
            (&[][..], Some("/x"), "no --cache"),
        ] {
            let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
            let e = parse_caches("ci", &specs, dir.map(Path::new))
                .unwrap_err()
                .to_string();
            assert!(e.contains(msg), "{specs:?}: {e}");
        }
    }
}
