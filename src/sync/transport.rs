//! The registry, through skopeo (layer blobs go over [`super::registry`]'s direct path where
//! it applies): the containers/image library buildah uses, so users'
//! `auth.json`, `registries.conf` (mirrors, insecure registries) and certificates apply
//! unchanged. skopeo rather than buildah because the images are assembled as OCI layouts here,
//! not in containers storage: copying a layout pushes exactly these blobs (digests preserved),
//! asks the registry for each blob before uploading it (a blob it has is never sent again, with
//! no dependence on a blob-info cache), and keeps no image storage in `/var/lib/containers`.
//! (skopeo 1.9 still writes its small blob-info cache to `/var/lib/containers/cache`; it has no
//! flag to move it. Temporary files go under the state dir with `--tmpdir`.)

use crate::error::{Error, ErrorKind, Result};
use crate::host::cmd::{self, ToolError, SKOPEO};
use crate::input::names::name_chars;
use std::time::{Duration, Instant};

/// A repository in a registry (`host[:port]/path`, no tag) and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// `host[:port]/path`.
    pub repo: String,
    /// Verify TLS (false: plain HTTP or self-signed registries).
    pub tls_verify: bool,
    /// Longest one skopeo run may take.
    pub timeout: Duration,
    /// Where skopeo keeps temporary files.
    pub tmpdir: Option<std::path::PathBuf>,
    /// When everything done through this remote must have ended (a setup inside the
    /// provisioner's timeout): each skopeo run gets what is left of it, at most `timeout`.
    pub deadline: Option<Instant>,
    /// The image an import reads, when the user named one: `:<tag>` or `@sha256:<hex>`
    /// (default: the line's moving tag, `:latest`). Export refuses one: it tags itself.
    pub reference: Option<String>,
    /// Whether layer blobs may move over the registry's HTTP API directly (see
    /// [`super::registry`]); skopeo otherwise.
    pub direct_blobs: bool,
}

/// The registry of cache `id` and whether its imports accept device nodes: the repository
/// `image` if given, else `<image>/<namespace>/<name>` of the config's `[[registry]]` for the
/// cache; `tls_verify` overrides the config's. `Ok(None)`: no registry applies.
pub fn remote_for(
    config: &crate::input::config::Config,
    id: &crate::input::names::CacheId,
    image: Option<&str>,
    tls_verify: Option<bool>,
) -> Result<Option<(Remote, bool)>> {
    let rule = config.registry_for(id);
    let tls = tls_verify.or(rule.map(|r| r.tls_verify)).unwrap_or(true);
    let timeout = Duration::from_secs(rule.map(|r| r.timeout).unwrap_or(300));
    let remote = match (image, rule) {
        (Some(i), _) => Remote::with_reference(i, tls, timeout)?,
        (None, Some(r)) => Remote::new(
            &format!("{}/{}/{}", r.image, id.namespace, id.name),
            tls,
            timeout,
        )?,
        (None, None) => return Ok(None),
    };
    let remote = Remote {
        direct_blobs: rule.is_none_or(|r| r.direct_blobs),
        ..remote
    };
    Ok(Some((remote, rule.is_some_and(|r| r.allow_devices))))
}

/// The moving tag: always the line's newest generation.
pub(crate) const LATEST: &str = "latest";

impl Remote {
    /// Checks `repo`: a fully qualified repository without tag or digest.
    pub fn new(repo: &str, tls_verify: bool, timeout: Duration) -> Result<Remote> {
        let fix = "give a fully qualified repository without tag, e.g. registry.example.com/caches/ci/maven";
        let repo = repo.trim_start_matches("docker://");
        let (host, path) = repo
            .split_once('/')
            .ok_or_else(|| Error::invalid(format!("image {repo:?} has no registry host: {fix}")))?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(Error::invalid(format!(
                "image {repo:?} does not start with a registry host: {fix}"
            )));
        }
        let last = path.rsplit('/').next().unwrap_or("");
        if path.is_empty() || repo.contains('@') || last.contains(':') {
            return Err(Error::invalid(format!(
                "image {repo:?} names a tag or digest: {fix} (jobcachefs tags each generation itself)"
            )));
        }
        if !name_chars(path, b"._/") {
            return Err(Error::invalid(format!(
                "image {repo:?} has characters a repository cannot have: {fix}"
            )));
        }
        Ok(Remote {
            repo: repo.to_string(),
            tls_verify,
            timeout,
            tmpdir: None,
            deadline: None,
            reference: None,
            direct_blobs: true,
        })
    }

    /// Ends everything done through this remote by `deadline`.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// What one step may still take: `timeout`, or less if the deadline is nearer. An error
    /// once the deadline has passed (a step is never started without time to finish).
    pub fn time_left(&self, what: &str) -> Result<Duration> {
        let Some(deadline) = self.deadline else {
            return Ok(self.timeout);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_secs(1) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "no time left to {what} {}: the deadline of this operation has passed",
                    self.repo
                ),
            ));
        }
        Ok(left.min(self.timeout))
    }

    /// Like [`Remote::new`], but `image` may end in `:<tag>` or `@sha256:<hex>`: the image an
    /// import seeds a cache from (any image, not only a jobcachefs line).
    pub fn with_reference(image: &str, tls_verify: bool, timeout: Duration) -> Result<Remote> {
        let image = image.trim_start_matches("docker://");
        let (repo, reference) = split_reference(image)?;
        let mut r = Remote::new(repo, tls_verify, timeout)?;
        r.reference = reference;
        Ok(r)
    }

    /// `repo` plus the reference an import reads (`:latest` unless the user named one).
    pub fn image_name(&self) -> String {
        format!(
            "{}{}",
            self.repo,
            self.reference.as_deref().unwrap_or(":latest")
        )
    }

    /// skopeo's global flags: the time limit, and temporary files under the state dir.
    fn global_args(&self, limit: Duration) -> Vec<String> {
        let mut a = vec![
            "--command-timeout".to_string(),
            format!("{}s", limit.as_secs().max(1)),
        ];
        if let Some(t) = &self.tmpdir {
            a.push("--tmpdir".into());
            a.push(t.display().to_string());
        }
        a
    }

    /// Puts skopeo's temporary files (a blob being downloaded) under `dir`, not `/var/tmp`.
    pub(crate) fn with_tmpdir(mut self, dir: std::path::PathBuf) -> Self {
        self.tmpdir = Some(dir);
        self
    }

    /// Classifies a skopeo failure: the registry's "not found" vs unreachable/auth/other. Only
    /// a run of skopeo that failed says anything about the registry; a missing skopeo stays a
    /// tool error (it must never read as "nothing pushed yet").
    fn failed(&self, what: &str, e: Error) -> Error {
        let m = e.to_string();
        let Some(tool @ ToolError::Failed { stderr, .. }) = e.tool() else {
            return Error::new(e.kind(), format!("{what} {}: {m}", self.repo)).with_tool_of(&e);
        };
        let kind = classify(stderr);
        let hint = match kind {
            ErrorKind::InvalidInput => {
                ": the registry refused the credentials or demanded some: check auth.json (`skopeo login`, REGISTRY_AUTH_FILE)"
            }
            ErrorKind::Unavailable => ": check that the registry is reachable (and --tls-verify for a plain-HTTP registry)",
            _ => "",
        };
        Error::new(kind, format!("{what} {}: {m}{hint}", self.repo)).with_tool(tool.clone())
    }

    /// Runs skopeo with the global flags, then `args`; a failure says what was being done.
    fn skopeo(&self, what: &str, args: &[String]) -> Result<String> {
        let mut all = self.global_args(self.time_left(what)?);
        all.extend_from_slice(args);
        cmd::run(&SKOPEO, &all).map_err(|e| self.failed(what, e))
    }

    /// `inspect --raw` of `reference` (`:<tag>` or `@<digest>`), plus `extra` flags.
    fn inspect(&self, what: &str, extra: &[&str], reference: &str) -> Result<Vec<u8>> {
        let mut args = vec!["inspect".to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("--raw".into());
        args.push(format!("--tls-verify={}", self.tls_verify));
        args.push(format!("docker://{}{reference}", self.repo));
        self.skopeo(what, &args).map(String::into_bytes)
    }

    /// `copy --preserve-digests` from `src` to `dst`; `tls_flag` names the remote side's flag.
    fn copy(&self, what: &str, tls_flag: &str, src: String, dst: String) -> Result<()> {
        let args = [
            "copy".to_string(),
            "--quiet".into(),
            "--preserve-digests".into(),
            format!("--{tls_flag}={}", self.tls_verify),
            src,
            dst,
        ];
        self.skopeo(what, &args).map(|_| ())
    }

    /// The raw manifest at `tag`, or `None` when the repository or tag does not exist.
    pub fn manifest(&self, tag: &str) -> Result<Option<Vec<u8>>> {
        self.manifest_at(&format!(":{tag}"))
    }

    /// The raw manifest (or index) at `reference` (`:<tag>` or `@<digest>`), or `None` when
    /// the repository or the reference does not exist.
    pub fn manifest_at(&self, reference: &str) -> Result<Option<Vec<u8>>> {
        match self.inspect("read the manifest of", &[], reference) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The image config of the image manifest `digest` (never of a tag: the tag may move
    /// between two reads).
    pub fn config(&self, digest: &str) -> Result<Vec<u8>> {
        self.inspect(
            "read the image config of",
            &["--config"],
            &format!("@{digest}"),
        )
    }

    /// Pushes image `name` of the OCI layout `layout` as `tag`.
    pub fn push(&self, layout: &std::path::Path, name: &str, tag: &str) -> Result<()> {
        self.copy(
            "push to",
            "dest-tls-verify",
            format!("oci:{}:{name}", layout.display()),
            format!("docker://{}:{tag}", self.repo),
        )
    }

    /// Pulls the manifest `digest` into the OCI layout as `name`; blobs the layout already has
    /// are not downloaded.
    pub fn pull(&self, digest: &str, layout: &std::path::Path, name: &str) -> Result<()> {
        self.copy(
            "pull from",
            "src-tls-verify",
            format!("docker://{}@{digest}", self.repo),
            format!("oci:{}:{name}", layout.display()),
        )
    }
}

/// Splits `host/path[:tag|@sha256:hex]` into the repository and the reference suffix.
fn split_reference(image: &str) -> Result<(&str, Option<String>)> {
    let fix = "name an image as REPOSITORY, REPOSITORY:TAG or REPOSITORY@sha256:DIGEST";
    if let Some((repo, digest)) = image.split_once('@') {
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(Error::invalid(format!(
                "image {image:?} has an invalid digest {digest:?}: {fix}"
            )));
        }
        return Ok((repo, Some(format!("@{digest}"))));
    }
    let slash = image.rfind('/').map(|i| i + 1).unwrap_or(image.len());
    match image[slash..].split_once(':') {
        Some((name, tag)) => {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && !tag.starts_with(['.', '-'])
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(Error::invalid(format!(
                    "image {image:?} has an invalid tag {tag:?}: {fix}"
                )));
            }
            Ok((&image[..slash + name.len()], Some(format!(":{tag}"))))
        }
        None => Ok((image, None)),
    }
}

/// What skopeo's stderr says about the registry: refused credentials, no such repository or
/// tag, or anything else (unreachable, timeouts, server errors).
fn classify(stderr: &str) -> ErrorKind {
    // Authentication first: a failed token request mentions the realm's "Not Found" too.
    if stderr.contains("unauthorized")
        || stderr.contains("authentication required")
        || stderr.contains("denied")
        || stderr.contains("bearer token")
    {
        ErrorKind::InvalidInput
    } else if stderr.contains("manifest unknown")
        || stderr.contains("name unknown")
        || stderr.contains("not found")
    {
        ErrorKind::NotFound
    } else {
        ErrorKind::Unavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> Remote {
        Remote::new("r.example.com/ci/maven", true, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn a_missing_skopeo_is_not_a_missing_image() {
        let missing = Error::new(
            ErrorKind::Tool,
            "skopeo not found in PATH: install the skopeo package",
        )
        .with_tool(ToolError::Missing {
            tool: "skopeo",
            package: "skopeo",
        });
        let e = remote().failed("read the manifest of", missing);
        assert_eq!(e.kind(), ErrorKind::Tool);
        assert!(matches!(e.tool(), Some(ToolError::Missing { .. })));
        assert_eq!(
            e.to_string(),
            "read the manifest of r.example.com/ci/maven: skopeo not found in PATH: install the skopeo package"
        );
    }

    #[test]
    fn skopeo_failures_are_classified_by_stderr() {
        for (stderr, kind) in [
            ("manifest unknown: manifest unknown", ErrorKind::NotFound),
            (
                "name unknown: repository name not known",
                ErrorKind::NotFound,
            ),
            (
                "unauthorized: authentication required",
                ErrorKind::InvalidInput,
            ),
            (
                "requested access to the resource is denied",
                ErrorKind::InvalidInput,
            ),
            (
                "dial tcp 10.0.0.1:443: connect: connection refused",
                ErrorKind::Unavailable,
            ),
        ] {
            let failed = Error::new(ErrorKind::Tool, format!("skopeo inspect failed: {stderr}"))
                .with_tool(ToolError::Failed {
                    tool: "skopeo",
                    code: Some(1),
                    stdout: String::new(),
                    stderr: stderr.to_string(),
                });
            let e = remote().failed("read the manifest of", failed);
            assert_eq!(e.kind(), kind, "{stderr}");
            assert!(e.tool().is_some());
        }
    }

    #[test]
    fn an_import_may_name_a_tag_or_digest() {
        let t = Duration::from_secs(5);
        let d = "sha256:".to_string() + &"ab".repeat(32);
        for (image, repo, reference) in [
            ("r.example.com/x", "r.example.com/x", None),
            (
                "127.0.0.1:5000/a/b:v1.2",
                "127.0.0.1:5000/a/b",
                Some(":v1.2"),
            ),
            (
                &*format!("docker://r.example.com/x@{d}"),
                "r.example.com/x",
                Some(&*format!("@{d}")),
            ),
        ] {
            let r = Remote::with_reference(image, true, t).unwrap();
            assert_eq!(
                (r.repo.as_str(), r.reference.as_deref()),
                (repo, reference),
                "{image}"
            );
        }
        for bad in [
            "r.example.com/x:",
            "r.example.com/x:-a",
            "r.example.com/x@sha256:00",
            "r.example.com/x@md5:00",
            "r.example.com/X:v1",
        ] {
            assert!(Remote::with_reference(bad, true, t).is_err(), "{bad}");
        }
    }

    #[test]
    fn repositories_are_checked() {
        let t = Duration::from_secs(5);
        assert_eq!(
            Remote::new("127.0.0.1:5000/caches/ci/maven", false, t)
                .unwrap()
                .repo,
            "127.0.0.1:5000/caches/ci/maven"
        );
        Remote::new("docker://registry.example.com/x", true, t).unwrap();
        for (bad, needle) in [
            ("maven", "no registry host"),
            ("library/maven", "does not start with a registry host"),
            ("r.example.com/x:1", "tag or digest"),
            ("r.example.com/x@sha256:00", "tag or digest"),
            ("r.example.com/X", "characters"),
        ] {
            let e = Remote::new(bad, true, t).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }
}
