//! The shipped helper image is real: helper-image/Containerfile's runtime stage is built with
//! buildah from a Debian 12 base this test makes itself (mmdebstrap from Debian's packages; no
//! docker.io here), around the jobcachefs binary built on the host, and `jobcachefs doctor` runs
//! inside it: a tool or library missing from the image fails here, not on a node.
//!
//! Needs root and Debian's mirror (as scripts/setup's apt-get does). The base tarball is cached
//! under target/ (CARGO_TARGET_TMPDIR), so only the first run pays for mmdebstrap. Container
//! storage lives in a temporary directory (vfs driver: no mounts to leak) and is removed on
//! every path; `--isolation chroot` needs no OCI runtime.

mod common;

use common::root_or_skip;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BASE: &str = "localhost/jcfs-test-debian:bookworm";
const IMAGE: &str = "localhost/jcfs-test-helper:latest";

/// buildah with a storage of its own; removes its containers and images on drop.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Buildah {
        let dir = tempfile::Builder::new()
            .prefix("jcfs-img-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                d.join("graph").display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        Buildah { dir }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("buildah");
        c.env(
            "CONTAINERS_STORAGE_CONF",
            self.dir.path().join("storage.conf"),
        )
        .args(args);
        c
    }

    /// Runs buildah; panics with its output on failure; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self
            .cmd(args)
            .output()
            .expect("run buildah (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "buildah {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "--all"]).output();
        let _ = self.cmd(&["rmi", "--all", "--force"]).output();
    }
}

/// A minimal Debian 12 root file system as a tarball (what bookworm-slim is), made once.
fn debian_base() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helper-image-base");
    let tar = dir.join("bookworm-minbase.tar");
    if tar.exists() {
        return tar;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let part = dir.join("bookworm-minbase.tar.part");
    let t = Instant::now();
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--mode=root",
            "--format=tar",
            "bookworm",
        ])
        .arg(&part)
        .arg("http://deb.debian.org/debian")
        .output()
        .expect("run mmdebstrap (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "mmdebstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&part, &tar).unwrap();
    eprintln!(
        "made the Debian base {} in {:?}",
        tar.display(),
        t.elapsed()
    );
    tar
}

#[test]
fn real_helper_image_builds_and_doctor_passes_its_tool_checks() {
    if !root_or_skip("real_helper_image_builds_and_doctor_passes_its_tool_checks") {
        return;
    }
    let base = debian_base();
    let b = Buildah::new();
    let c = b.ok(&["from", "scratch"]).trim().to_string();
    b.ok(&["add", "--quiet", &c, base.to_str().unwrap(), "/"]);
    b.ok(&["commit", "--quiet", &c, BASE]);
    b.ok(&["rm", &c]);

    // The build context: what the Containerfile's host-binary target copies.
    let ctx = b.dir.path().join("context");
    std::fs::create_dir_all(ctx.join("config")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_jobcachefs"), ctx.join("jobcachefs")).unwrap();
    std::fs::copy(
        Path::new(REPO).join("config/jobcachefs.example.toml"),
        ctx.join("config/jobcachefs.example.toml"),
    )
    .unwrap();
    let t = Instant::now();
    b.ok(&[
        "build",
        "--isolation",
        "chroot",
        "--target",
        "host-binary",
        "--build-arg",
        &format!("BASE={BASE}"),
        "-f",
        &format!("{REPO}/helper-image/Containerfile"),
        "-t",
        IMAGE,
        ctx.to_str().unwrap(),
    ]);
    eprintln!("buildah build of the runtime stage took {:?}", t.elapsed());

    let run = b.ok(&["from", "--name", "jcfs-test-helper-run", IMAGE]);
    assert!(run.contains("jcfs-test-helper-run"), "{run}");
    // The trial mount needs privileges a chroot-isolated run has not (a helper pod has them):
    // doctor's exit code reflects it, so only its findings are read.
    let out = b
        .cmd(&[
            "run",
            "--isolation",
            "chroot",
            "jcfs-test-helper-run",
            "--",
            "jobcachefs",
            "-o",
            "json",
            "doctor",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let findings: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "jobcachefs doctor did not run in the image ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings = findings.as_array().unwrap();
    for tool in ["mkfs.ext4", "e2fsck", "resize2fs", "skopeo"] {
        let f = findings
            .iter()
            .find(|f| f["check"] == format!("tool {tool}"))
            .unwrap_or_else(|| panic!("doctor did not check {tool}: {stdout}"));
        assert_eq!(f["status"], "ok", "{tool} in the image: {f}");
    }
    for check in ["kernel ext4", "kernel overlay", "state dir"] {
        let f = findings.iter().find(|f| f["check"] == check).unwrap();
        assert_eq!(f["status"], "ok", "{check}: {f}");
    }
    // The operator tools the image promises (helper-image/README.md).
    for tool in ["losetup", "findmnt", "mount", "buildah"] {
        b.ok(&[
            "run",
            "--isolation",
            "chroot",
            "jcfs-test-helper-run",
            "--",
            "sh",
            "-c",
            &format!("command -v {tool}"),
        ]);
    }
}
