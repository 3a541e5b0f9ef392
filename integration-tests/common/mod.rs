//! Shared harness of the privileged integration tests: a temporary "node" (its own state dir)
//! that runs the real binary, and a guard that leaves no mount and no loop device behind —
//! on success, on failure and on panic. `JOBCACHEFS_KEEP_TEST_STATE=1` keeps the state dir (its
//! mounts are still removed) for debugging.

#![allow(dead_code)]

pub mod api;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// True when running as root; otherwise prints a loud SKIPPED line and the test returns early.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "\n!!!!! SKIPPED {test}: needs root (loop devices, mounts). CI runs it as root. !!!!!\n"
    );
    false
}

/// A temporary node: a state dir and a scratch area for volume DIRs.
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub config: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Config every test node starts from: layer mounts go with their last volume, so that a test
/// that deleted every volume can check that nothing stays mounted (the keep itself is tested
/// in `real_layer_mounts_stay_after_the_last_volume` and the engine's unit tests).
pub const NODE_DEFAULTS: &str = "layer_keep_seconds = 0\n";

impl Node {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("jcfs-test-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir(tmp.path().join("state")).unwrap();
        std::fs::create_dir(tmp.path().join("vols")).unwrap();
        Node {
            tmp,
            config: None,
            env: Vec::new(),
        }
    }

    /// A node whose config file holds `toml` (plus [`NODE_DEFAULTS`] unless it sets them).
    pub fn with_config(toml: &str) -> Self {
        let mut n = Node::new();
        let p = n.tmp.path().join("config.toml");
        let toml = if toml.contains("layer_keep_seconds") {
            toml.to_string()
        } else {
            format!("{NODE_DEFAULTS}{toml}")
        };
        std::fs::write(&p, toml).unwrap();
        n.config = Some(p);
        n
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    /// A volume DIR path (not created).
    pub fn vol(&self, name: &str) -> PathBuf {
        self.tmp.path().join("vols").join(name)
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_jobcachefs"));
        c.env("JOBCACHEFS_STATE_DIR", self.state());
        c.env("JOBCACHEFS_LOG", "info");
        c.env_remove("JOBCACHEFS_CRASH_AT");
        match &self.config {
            Some(p) => c.env("JOBCACHEFS_CONFIG", p),
            None => c.env("JOBCACHEFS_CONFIG", self.tmp.path().join("no-config.toml")),
        };
        if self.config.is_none() {
            // An explicit but missing config is an error; use one with the defaults.
            std::fs::write(self.tmp.path().join("no-config.toml"), NODE_DEFAULTS).unwrap();
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.command();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out: Output = c.output().expect("run jobcachefs");
        let code = out.status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + out.status.signal().unwrap_or(0)
        });
        Run {
            code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `volume create DIR --cache NAME` plus extra args; returns DIR.
    pub fn create(&self, name: &str, cache: &str, extra: &[&str]) -> PathBuf {
        let dir = self.vol(name);
        let mut args = vec!["volume", "create", dir.to_str().unwrap(), "--cache", cache];
        args.extend_from_slice(extra);
        self.run(&args).ok();
        dir
    }

    pub fn delete(&self, dir: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["volume", "delete", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    pub fn show(&self, cache: &str) -> serde_json::Value {
        self.run(&["cache", "show", cache, "-o", "json"])
            .ok()
            .json()
    }

    pub fn generation(&self, cache: &str) -> u64 {
        let r = self.run(&["cache", "show", cache, "-o", "json"]);
        if r.code == 4 {
            return 0;
        }
        r.ok().json()["generation"].as_u64().unwrap()
    }

    /// Mount points under this node's temp dir (state mounts and volume DIRs).
    pub fn mounts(&self) -> Vec<PathBuf> {
        leaked_mounts(self.tmp.path())
    }

    /// Loop devices backed by files under this node's temp dir.
    pub fn loops(&self) -> Vec<String> {
        leaked_loops(self.tmp.path())
    }

    /// Asserts nothing of this node is mounted or attached.
    /// Nothing of a volume is left mounted or attached (the reflink pool, node infrastructure
    /// that stays mounted between volumes, is allowed).
    pub fn assert_clean_volumes(&self) {
        let vols = self.vol("");
        let m: Vec<_> = self
            .mounts()
            .into_iter()
            .filter(|p| p.starts_with(&vols))
            .collect();
        assert_eq!(m, Vec::<PathBuf>::new(), "leaked volume mounts");
        let l: Vec<_> = self
            .loops()
            .into_iter()
            .filter(|l| !l.ends_with("/state/pool.img"))
            .collect();
        assert_eq!(l, Vec::<String>::new(), "leaked loop devices");
    }

    pub fn assert_clean(&self) {
        assert_eq!(self.mounts(), Vec::<PathBuf>::new(), "leaked mounts");
        assert_eq!(self.loops(), Vec::<String>::new(), "leaked loop devices");
    }
}

pub fn leaked_mounts(under: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    jobcachefs::host::mounts::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(under))
        .collect()
}

pub fn leaked_loops(under: &Path) -> Vec<String> {
    // Give autoclear a moment: the kernel releases a device right after its last unmount.
    for _ in 0..50 {
        let l: Vec<String> = jobcachefs::host::loopback::list()
            .into_iter()
            .filter(|b| b.file.starts_with(under))
            .map(|b| format!("{} {}", b.device.display(), b.file.display()))
            .collect();
        if l.is_empty() {
            return l;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    jobcachefs::host::loopback::list()
        .into_iter()
        .filter(|b| b.file.starts_with(under))
        .map(|b| format!("{} {}", b.device.display(), b.file.display()))
        .collect()
}

impl Drop for Node {
    fn drop(&mut self) {
        // Best effort through the binary first (discard every volume), then force: deepest
        // mounts first, lazily, and detach what is left.
        if let Ok(out) = self.command().args(["volume", "ls", "-o", "json"]).output() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                for vol in v.as_array().cloned().unwrap_or_default() {
                    if let Some(d) = vol["dir"].as_str() {
                        let _ = self
                            .command()
                            .args(["volume", "delete", d, "--discard"])
                            .output();
                    }
                }
            }
        }
        let _ = self.command().args(["gc"]).output();
        let mut mounts = self.mounts();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        for b in jobcachefs::host::loopback::list() {
            if b.file.starts_with(self.tmp.path()) {
                let _ = jobcachefs::host::loopback::detach(&b.device);
            }
        }
        if std::env::var_os("JOBCACHEFS_KEEP_TEST_STATE").is_some() {
            let p = std::mem::replace(&mut self.tmp, tempfile::tempdir().unwrap()).keep();
            eprintln!("kept test state in {}", p.display());
        }
    }
}

/// Runs a shell snippet (for building trees the way users' tools would).
pub fn sh(script: &str) {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "sh failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn snap(dir: &Path) -> jobcachefs::files::tree::Snapshot {
    jobcachefs::files::tree::snapshot(dir).unwrap()
}

pub fn assert_same_tree(expected: &jobcachefs::files::tree::Snapshot, dir: &Path, what: &str) {
    let d = jobcachefs::files::tree::diff(expected, &snap(dir));
    assert!(
        d.is_empty(),
        "{what}: tree differs from the merged view at delete time:\n{}",
        d.join("\n")
    );
}

/// Builds a tree with every kind of metadata a build cache can hold. `host_refs` adds an absolute
/// symlink and a device node, which registry import refuses by default.
pub fn rich_tree(dir: &Path, host_refs: bool) {
    sh(&format!(
        "cd {d}; mkdir -p a/b/c empty; echo hello > a/file; ln a/file a/hardlink; ln -s ../file a/b/rel; \
         mkfifo fifo; \
         truncate -s 50M sparse; printf x | dd of=sparse bs=1 seek=30000000 conv=notrunc status=none; \
         head -c 300000 /dev/urandom > a/b/c/random; \
         chown 1234:5678 a/b; chmod 2750 a/b; chmod 4755 a/file; chmod 700 empty; \
         touch -h -d '2021-02-03 04:05:06.123456789' a/b/rel; \
         touch -d '2020-01-01 00:00:00.987654321' a/b/c/random a/b/c",
        d = dir.display()
    ));
    if host_refs {
        sh(&format!(
            "cd {}; ln -s /etc/passwd abs; mknod null c 1 3",
            dir.display()
        ));
    }
    xattr::set(dir.join("a/file"), "user.origin", b"maven-central").unwrap();
    xattr::set(dir.join("a/b"), "trusted.cache", b"yes").unwrap();
    xattr::set(dir.join("empty"), "security.test", b"1").unwrap_or(());
}

/// A tiny deterministic generator (xorshift64*), so a failing campaign is replayed by its seed
/// (which must not be 0).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}
