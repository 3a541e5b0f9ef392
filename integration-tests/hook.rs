//! The Kubernetes hook, run the way local-path-provisioner v0.0.37 runs it: the very `setup` and
//! `teardown` scripts of deploy/'s ConfigMap, through `/bin/sh`, with the provisioner's arguments
//! and `VOL_*` environment, against a stand-in API server (integration-tests/k8s-api/server.py:
//! HTTPS with a self-signed CA, reached through a KUBECONFIG, serving recorded PVC and
//! StorageClass objects). Real loop devices, ext4 and overlayfs underneath.

mod common;

use common::api::{openssl, pvc_path, sc_path, Api, ServerCert, TOKEN};
use common::{root_or_skip, Node, Run};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The provisioner's side: runs deploy/'s scripts as its helper pod does.
struct Provisioner {
    node: Node,
    scripts: PathBuf,
    kubeconfig: PathBuf,
    /// Run as in a pod: (service account dir, API port) instead of the kubeconfig.
    service_account: Option<(PathBuf, String)>,
}

impl Provisioner {
    fn new(api: &Api, extra_config: &str) -> Provisioner {
        let node = Node::with_config("");
        let config = format!(
            "{}[kubernetes]\nnode_paths = [{:?}]\napi_timeout = \"3s\"\n{extra_config}",
            common::NODE_DEFAULTS,
            node.tmp.path().join("vols").display().to_string()
        );
        std::fs::write(node.config.as_ref().unwrap(), config).unwrap();
        let scripts = node.tmp.path().join("script");
        std::fs::create_dir(&scripts).unwrap();
        for s in ["setup", "teardown"] {
            std::fs::copy(
                Path::new(REPO).join("deploy/provisioner").join(s),
                scripts.join(s),
            )
            .unwrap();
        }
        Provisioner {
            node,
            scripts,
            kubeconfig: api.kubeconfig.clone(),
            service_account: None,
        }
    }

    /// The volume path the provisioner makes for PV `pv` of PVC `ns/pvc` (default folder form).
    fn path(&self, pv: &str, ns: &str, pvc: &str) -> PathBuf {
        self.node.vol(&format!("{pv}_{ns}_{pvc}"))
    }

    /// `/bin/sh /script/<script> -p PATH -s BYTES -m MODE -a ACTION` with the provisioner's env.
    fn run(&self, script: &str, path: &Path, bytes: u64, mode: &str, env: &[(&str, &str)]) -> Run {
        let base = self.node.command();
        let mut c = Command::new("/bin/sh");
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_jobcachefs"))
            .parent()
            .unwrap();
        c.env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        );
        match &self.service_account {
            // In a pod: the service account's token and CA, and the API's service address.
            Some((dir, port)) => {
                c.env_remove("KUBECONFIG");
                c.env("KUBERNETES_SERVICE_HOST", "127.0.0.1");
                c.env("KUBERNETES_SERVICE_PORT", port);
                c.env("JOBCACHEFS_SERVICE_ACCOUNT_DIR", dir);
            }
            None => {
                c.env("KUBECONFIG", &self.kubeconfig);
                c.env_remove("KUBERNETES_SERVICE_HOST");
            }
        }
        let action = if script == "setup" {
            "create"
        } else {
            "delete"
        };
        c.env("VOL_DIR", path)
            .env("VOL_MODE", mode)
            .env("VOL_SIZE_BYTES", bytes.to_string());
        for k in ["VOL_USER", "VOL_GROUP", "VOL_PERM"] {
            c.env(k, "");
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.arg(self.scripts.join(script)).arg("-p").arg(path).args([
            "-s",
            &bytes.to_string(),
            "-m",
            mode,
            "-a",
            action,
        ]);
        let out = c.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn setup(&self, path: &Path, bytes: u64) -> Run {
        self.run("setup", path, bytes, "Filesystem", &[])
    }

    fn teardown(&self, path: &Path, bytes: u64) -> Run {
        self.run("teardown", path, bytes, "Filesystem", &[])
    }

    fn generation(&self, ns: &str, cache: &str) -> u64 {
        let r = self
            .node
            .run(&["cache", "show", cache, "--namespace", ns, "-o", "json"]);
        if r.code == 4 {
            return 0;
        }
        r.ok().json()["generation"].as_u64().unwrap()
    }

    fn volumes(&self) -> Vec<Value> {
        self.node
            .run(&["volume", "ls", "-o", "json"])
            .ok()
            .json()
            .as_array()
            .cloned()
            .unwrap()
    }

    /// Asserts a failed setup changed nothing: no volume, no folder, no mount, no loop device.
    fn assert_untouched(&self, path: &Path) {
        assert_eq!(self.volumes(), Vec::<Value>::new());
        assert!(!path.exists(), "{} was created", path.display());
        self.node.assert_clean();
    }
}

/// An API stand-in serving deploy/'s StorageClasses, and a provisioner using it.
fn world() -> (Api, Provisioner) {
    let api = Api::start();
    api.storage_classes_from_deploy();
    let p = Provisioner::new(&api, "");
    (api, p)
}

const MI: u64 = 1 << 20;
const PV1: &str = "pvc-11111111-aaaa-4bbb-8ccc-000000000001";
const PV2: &str = "pvc-22222222-aaaa-4bbb-8ccc-000000000002";
const PV3: &str = "pvc-33333333-aaaa-4bbb-8ccc-000000000003";
const PV4: &str = "pvc-44444444-aaaa-4bbb-8ccc-000000000004";
const PV5: &str = "pvc-55555555-aaaa-4bbb-8ccc-000000000005";

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn real_hook_lifecycle_write_back_read_only_and_plain() {
    if !root_or_skip("real_hook_lifecycle_write_back_read_only_and_plain") {
        return;
    }
    let (api, p) = world();
    let cache = [("jobcachefs.io/cache", "maven")];
    api.pvc("ci", "build-1", "jobcache-writeback", &cache, "64Mi");
    api.pvc("ci", "build-2", "jobcache-writeback", &cache, "64Mi");
    api.pvc("ci", "pr-1", "jobcache", &cache, "64Mi");
    api.pvc("ci", "plain", "jobcache", &[], "32Mi");

    // Two build volumes of one cache on the write-back class, live at the same time.
    let v1 = p.path(PV1, "ci", "build-1");
    let v2 = p.path(PV2, "ci", "build-2");
    let r = p.setup(&v1, 64 * MI).ok();
    assert!(
        r.stdout.contains("cache ci/maven generation 0, write-back"),
        "{}",
        r.stdout
    );
    p.setup(&v2, 64 * MI).ok();
    write(&v1, "m2/a/a.jar", "from build 1");
    write(&v2, "m2/b/b.jar", "from build 2");
    // The volume's root is the provisioner's: world-writable, like its stock `mkdir -m 0777`.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&v1).unwrap().permissions().mode() & 0o7777,
        0o777
    );

    // A PR build on the read-only class, writing what must never reach the cache.
    let v3 = p.path(PV3, "ci", "pr-1");
    let r = p.setup(&v3, 64 * MI).ok();
    assert!(r.stdout.contains("read-only for the cache"), "{}", r.stdout);
    write(&v3, "m2/poison.jar", "from an untrusted PR");

    // A PVC without the annotation: a plain, empty, size-limited volume.
    let v4 = p.path(PV4, "ci", "plain");
    let r = p.setup(&v4, 32 * MI).ok();
    assert!(r.stdout.contains("no cache (plain volume)"), "{}", r.stdout);
    assert_eq!(std::fs::read_dir(&v4).unwrap().count(), 0);
    let big = vec![7u8; 40 * MI as usize];
    let err = std::fs::write(v4.join("big"), &big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");

    // The volume records carry what teardown needs.
    let vols = p.volumes();
    assert_eq!(vols.len(), 4);
    let rec1 = vols
        .iter()
        .find(|v| v["dir"] == v1.to_str().unwrap())
        .unwrap();
    assert_eq!(rec1["labels"]["jobcachefs.io/pvc"], "build-1");
    assert_eq!(rec1["labels"]["jobcachefs.io/pv"], PV1);
    assert_eq!(
        rec1["labels"]["jobcachefs.io/storage-class"],
        "jobcache-writeback"
    );

    // The PVCs are deleted before teardown, as Kubernetes does; teardown must not ask the API.
    for n in ["build-1", "build-2", "pr-1", "plain"] {
        api.remove(&pvc_path("ci", n));
    }
    let asked = api.requests().len();
    let r = p.teardown(&v1, 64 * MI).ok();
    assert!(
        r.stdout.contains("committed as generation 1"),
        "{}",
        r.stdout
    );
    assert!(!v1.exists(), "teardown removes the folder");
    assert_eq!(p.generation("ci", "maven"), 1);
    // A retried teardown succeeds and changes nothing.
    let r = p.teardown(&v1, 64 * MI).ok();
    assert!(r.stdout.contains("already deleted"), "{}", r.stdout);
    assert_eq!(p.generation("ci", "maven"), 1);

    let r = p.teardown(&v3, 64 * MI).ok();
    assert!(r.stdout.contains("changes discarded"), "{}", r.stdout);
    assert_eq!(
        p.generation("ci", "maven"),
        1,
        "the read-only class changed the cache"
    );
    p.teardown(&v2, 64 * MI).ok();
    assert_eq!(p.generation("ci", "maven"), 2);
    p.teardown(&v4, 32 * MI).ok();
    assert_eq!(api.requests().len(), asked, "teardown asked the API");

    // The next build finds both write-back builds' files and nothing of the PR build.
    api.pvc("ci", "build-3", "jobcache-writeback", &cache, "64Mi");
    let v5 = p.path(PV5, "ci", "build-3");
    let r = p.setup(&v5, 64 * MI).ok();
    assert!(r.stdout.contains("generation 2"), "{}", r.stdout);
    assert_eq!(
        std::fs::read_to_string(v5.join("m2/a/a.jar")).unwrap(),
        "from build 1"
    );
    assert_eq!(
        std::fs::read_to_string(v5.join("m2/b/b.jar")).unwrap(),
        "from build 2"
    );
    assert!(!v5.join("m2/poison.jar").exists());
    // A retried setup of the same path is a no-op success, without asking the API.
    let asked = api.requests().len();
    let r = p.setup(&v5, 64 * MI).ok();
    assert!(r.stdout.contains("already set up"), "{}", r.stdout);
    assert_eq!(api.requests().len(), asked);
    assert_eq!(p.volumes().len(), 1);
    api.remove(&pvc_path("ci", "build-3"));
    let r = p.teardown(&v5, 64 * MI).ok();
    assert!(r.stdout.contains("nothing changed"), "{}", r.stdout);
    assert_eq!(p.generation("ci", "maven"), 2);
    p.node.assert_clean();
}

#[test]
fn real_hook_path_pattern_owner_and_opt_out() {
    if !root_or_skip("real_hook_path_pattern_owner_and_opt_out") {
        return;
    }
    let (api, p) = world();
    // pathPattern "{{ .PVC.Namespace }}/{{ .PVC.Name }}/{{ .PVName }}"; the PVC opts out of
    // writing back although its class would.
    api.pvc(
        "team-a",
        "gradle.cache",
        "jobcache-writeback",
        &[
            ("jobcachefs.io/cache", "gradle"),
            ("jobcachefs.io/write-back", "false"),
        ],
        "16Mi",
    );
    let path = p.node.vol(&format!("team-a/gradle.cache/{PV1}"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let r = p.run(
        "setup",
        &path,
        16 * MI,
        "Filesystem",
        &[
            ("VOL_USER", "1000"),
            ("VOL_GROUP", "3000"),
            ("VOL_PERM", "0750"),
        ],
    );
    let r = r.ok();
    assert!(
        r.stdout
            .contains("cache team-a/gradle generation 0, read-only"),
        "{}",
        r.stdout
    );
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (1000, 3000, 0o750)
    );
    write(&path, "x", "y");
    api.remove(&pvc_path("team-a", "gradle.cache"));
    let r = p.teardown(&path, 16 * MI).ok();
    assert!(r.stdout.contains("changes discarded"), "{}", r.stdout);
    assert_eq!(p.generation("team-a", "gradle"), 0);
    p.node.assert_clean();
}

#[test]
fn real_hook_in_cluster_service_account() {
    if !root_or_skip("real_hook_in_cluster_service_account") {
        return;
    }
    let (api, mut p) = world();
    // What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount.
    let sa = p.node.tmp.path().join("serviceaccount");
    std::fs::create_dir(&sa).unwrap();
    std::fs::write(sa.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::copy(api.dir.path().join("ca.crt"), sa.join("ca.crt")).unwrap();
    let port = std::fs::read_to_string(api.dir.path().join("port")).unwrap();
    p.service_account = Some((sa.clone(), port));
    api.pvc(
        "ci",
        "in-pod",
        "jobcache-writeback",
        &[("jobcachefs.io/cache", "npm")],
        "16Mi",
    );
    let path = p.path(PV1, "ci", "in-pod");
    let r = p.setup(&path, 16 * MI).ok();
    assert!(
        r.stdout.contains("cache ci/npm generation 0, write-back"),
        "{}",
        r.stdout
    );
    write(&path, "npm/_cacache/index", "x");
    api.remove(&pvc_path("ci", "in-pod"));
    p.teardown(&path, 16 * MI).ok();
    assert_eq!(p.generation("ci", "npm"), 1);
    // A token the API does not know: refused with the RBAC hint.
    std::fs::write(sa.join("token"), "stale\n").unwrap();
    api.pvc("ci", "in-pod", "jobcache", &[], "16Mi");
    refused(&p, &path, 16 * MI, "Filesystem", 2, &["HTTP 401"]);
}

/// Runs a setup expected to fail; checks exit code, message and that nothing changed.
fn refused(p: &Provisioner, path: &Path, bytes: u64, mode: &str, code: i32, needles: &[&str]) {
    let r = p.run("setup", path, bytes, mode, &[]);
    assert_eq!(r.code, code, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "missing {n:?} in: {}", r.stderr);
    }
    p.assert_untouched(path);
}

#[test]
fn real_hook_refuses_bad_requests_and_changes_nothing() {
    if !root_or_skip("real_hook_refuses_bad_requests_and_changes_nothing") {
        return;
    }
    let (api, p) = world();
    let cache = [("jobcachefs.io/cache", "maven")];

    // Above the class's max-volume-size (20Gi in deploy/storageclasses.yaml): both numbers.
    api.pvc("ci", "huge", "jobcache", &cache, "21Gi");
    refused(
        &p,
        &p.path(PV1, "ci", "huge"),
        21 << 30,
        "Filesystem",
        3,
        &[
            "21.0 GiB",
            "22548578304",
            "20.0 GiB",
            "21474836480",
            "max-volume-size",
        ],
    );
    // Unknown StorageClass.
    api.pvc("ci", "typo", "jobcache-wirteback", &cache, "1Gi");
    refused(
        &p,
        &p.path(PV1, "ci", "typo"),
        1 << 30,
        "Filesystem",
        4,
        &[
            "storageclasses.storage.k8s.io \"jobcache-wirteback\" not found",
            "unknown StorageClass",
        ],
    );
    // The PVC is gone (404 from the API).
    refused(
        &p,
        &p.path(PV1, "ci", "gone"),
        1 << 30,
        "Filesystem",
        4,
        &["persistentvolumeclaims \"gone\" not found"],
    );
    // A bad annotation on the PVC.
    api.pvc(
        "ci",
        "bad-name",
        "jobcache",
        &[("jobcachefs.io/cache", "Maven_Repo")],
        "1Gi",
    );
    refused(
        &p,
        &p.path(PV1, "ci", "bad-name"),
        1 << 30,
        "Filesystem",
        2,
        &["\"Maven_Repo\""],
    );
    // Block mode.
    api.pvc("ci", "block", "jobcache", &cache, "1Gi");
    refused(
        &p,
        &p.path(PV1, "ci", "block"),
        1 << 30,
        "Block",
        2,
        &["volumeMode Block is not supported"],
    );
    // Malformed paths: `..`, missing parts, outside the node path.
    let vols = p.node.tmp.path().join("vols");
    for (path, needle) in [
        (vols.join(format!("../{PV1}_ci_x")), "'..'"),
        (
            vols.join(format!("{PV1}_ci")),
            "is not <pv>_<namespace>_<pvc>",
        ),
        (vols.join("ci"), "is not <pv>_<namespace>_<pvc>"),
        (
            PathBuf::from(format!("/srv/elsewhere/{PV1}_ci_x")),
            "not under a node path",
        ),
    ] {
        refused(&p, &path, 1 << 30, "Filesystem", 2, &[needle]);
    }
    // Wrong credentials: a clear pointer at RBAC, no retry storm.
    let bad = api.write_kubeconfig(
        std::fs::read_to_string(&p.kubeconfig)
            .unwrap()
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .unwrap(),
        "not-the-token",
    );
    let p2 = Provisioner {
        kubeconfig: bad,
        ..Provisioner::new(&api, "")
    };
    api.pvc("ci", "ok", "jobcache", &cache, "1Gi");
    refused(
        &p2,
        &p2.path(PV1, "ci", "ok"),
        1 << 30,
        "Filesystem",
        2,
        &["HTTP 401", "service account"],
    );
}

#[test]
fn real_hook_retries_transient_api_errors_within_a_bound() {
    if !root_or_skip("real_hook_retries_transient_api_errors_within_a_bound") {
        return;
    }
    let (api, p) = world();
    let cache = [("jobcachefs.io/cache", "maven")];
    api.pvc("ci", "flaky", "jobcache", &cache, "16Mi");

    // Two 500s, then the answer: the setup succeeds.
    api.faults(&json!({ pvc_path("ci", "flaky"): [500, 503] }));
    let path = p.path(PV1, "ci", "flaky");
    p.setup(&path, 16 * MI).ok();
    let codes: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|l| l.contains("/flaky "))
        .collect();
    assert_eq!(codes.len(), 3, "{codes:?}");
    p.teardown(&path, 16 * MI).ok();

    // 500 on every attempt: a clear error within the configured bound (api_timeout = 3s).
    api.faults(&json!({ pvc_path("ci", "flaky"): vec![500; 50] }));
    let t = Instant::now();
    refused(
        &p,
        &path,
        16 * MI,
        "Filesystem",
        7,
        &["HTTP 500", "attempts"],
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );

    // An API server that accepts and never answers: bounded too.
    api.faults(&json!({ pvc_path("ci", "flaky"): [0] }));
    let t = Instant::now();
    refused(
        &p,
        &path,
        16 * MI,
        "Filesystem",
        7,
        &["could not read PVC ci/flaky"],
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );

    // Nothing listening at all.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p2 = Provisioner {
        kubeconfig: api.write_kubeconfig(&format!("https://127.0.0.1:{closed}"), TOKEN),
        ..Provisioner::new(&api, "")
    };
    let t = Instant::now();
    refused(
        &p2,
        &p2.path(PV1, "ci", "flaky"),
        16 * MI,
        "Filesystem",
        7,
        &[
            "could not read PVC ci/flaky",
            &format!("127.0.0.1:{closed}"),
        ],
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

/// A class with `userPattern`/`groupPattern` makes the provisioner pass whatever they render to in
/// `VOL_USER`/`VOL_GROUP`: names the helper pod knows are resolved, anything else leaves the root
/// to root with a log line, and the setup succeeds either way.
#[test]
fn real_hook_owner_names_from_user_and_group_patterns() {
    if !root_or_skip("real_hook_owner_names_from_user_and_group_patterns") {
        return;
    }
    let (api, p) = world();
    // `daemon` is 1:1 in every Debian /etc/passwd and /etc/group (base-passwd).
    let id_of = |file: &str, name: &str| -> u32 {
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f[0] == name).then(|| f[2].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} in {file}"))
    };
    let (uid, gid) = (
        id_of("/etc/passwd", "daemon"),
        id_of("/etc/group", "daemon"),
    );
    use std::os::unix::fs::MetadataExt;
    for (pv, pvc, user, group, want, log) in [
        (PV1, "named", "daemon", "daemon", (uid, gid), None),
        (
            PV2,
            "unknown",
            "no-such-user-here",
            "team-{{ .PVC.Name }}",
            (0, 0),
            // The log is JSON: the quotes around the values come escaped.
            Some([
                r#"VOL_USER=\"no-such-user-here\""#,
                r#"VOL_GROUP=\"team-{{ .PVC.Name }}\""#,
            ]),
        ),
    ] {
        api.pvc("ci", pvc, "jobcache", &[], "16Mi");
        let path = p.path(pv, "ci", pvc);
        let r = p
            .run(
                "setup",
                &path,
                16 * MI,
                "Filesystem",
                &[
                    ("VOL_USER", user),
                    ("VOL_GROUP", group),
                    ("VOL_PERM", "0770"),
                ],
            )
            .ok();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (want.0, want.1, 0o770)
        );
        for needle in log.into_iter().flatten() {
            assert!(
                r.stderr.contains(needle) && r.stderr.contains("ignored"),
                "no log line about {needle}: {}",
                r.stderr
            );
        }
        p.teardown(&path, 16 * MI).ok();
    }
    p.node.assert_clean();
}

/// `pull_on_create` on a cold cache, against a registry that accepts connections and never
/// answers: the setup gives up the pull at `kubernetes.setup_deadline` and makes the volume
/// cold, inside the provisioner's timeout, instead of hanging until the helper pod is deleted.
#[test]
fn real_hook_cold_pull_ends_at_the_setup_deadline() {
    if !root_or_skip("real_hook_cold_pull_ends_at_the_setup_deadline") {
        return;
    }
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hung.local_addr().unwrap().port();
    // Accepts and holds every connection, never writing a byte.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hung.incoming() {
            held.push(c);
        }
    });
    let api = Api::start();
    api.storage_classes_from_deploy();
    let p = Provisioner::new(
        &api,
        &format!(
            "setup_deadline = \"4s\"\n[[registry]]\nimage = \"127.0.0.1:{port}/caches\"\ntls_verify = false\npull_on_create = true\ntimeout = \"300s\"\n"
        ),
    );
    api.pvc(
        "ci",
        "cold",
        "jobcache",
        &[("jobcachefs.io/cache", "maven")],
        "16Mi",
    );
    let path = p.path(PV1, "ci", "cold");
    let t = Instant::now();
    let r = p.setup(&path, 16 * MI).ok();
    let took = t.elapsed();
    eprintln!("setup with a hung registry and setup_deadline 4s took {took:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(
        r.stdout.contains("cache ci/maven generation 0"),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("setup deadline") && r.stderr.contains("starts cold"),
        "{}",
        r.stderr
    );
    p.teardown(&path, 16 * MI).ok();
    p.node.assert_clean();
}

/// API TLS as kubectl does it: a self-signed server certificate given as the CA is accepted
/// (webpki alone refuses it as CaUsedAsEndEntity); a server certificate that the kubeconfig's CA
/// did not sign fails at once — no retries of what no retry can fix — with a message that names
/// the cause and the kubeconfig field to fix.
#[test]
fn real_hook_api_tls_like_kubectl() {
    if !root_or_skip("real_hook_api_tls_like_kubectl") {
        return;
    }
    let api = Api::start_with(ServerCert::SelfSigned);
    api.storage_classes_from_deploy();
    let p = Provisioner::new(&api, "");
    api.pvc("ci", "self-signed", "jobcache", &[], "16Mi");
    let path = p.path(PV1, "ci", "self-signed");
    let r = p.setup(&path, 16 * MI).ok();
    assert!(r.stdout.contains("no cache (plain volume)"), "{}", r.stdout);
    p.teardown(&path, 16 * MI).ok();

    // A kubeconfig naming another CA, for the self-signed server and for a CA-signed one.
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other-ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=some-other-ca",
        ],
        api.dir.path(),
    );
    let other_ca = api.dir.path().join("other-ca.crt");
    let signed = Api::start();
    for server in [&api, &signed] {
        let port = std::fs::read_to_string(server.dir.path().join("port")).unwrap();
        let wrong = Provisioner {
            kubeconfig: server.write_kubeconfig_with_ca(
                &format!("https://127.0.0.1:{port}"),
                TOKEN,
                &other_ca,
            ),
            ..Provisioner::new(server, "")
        };
        let wrong_path = wrong.path(PV2, "ci", "self-signed");
        let t = Instant::now();
        let r = wrong.setup(&wrong_path, 16 * MI);
        let took = t.elapsed();
        eprintln!("setup with a kubeconfig naming the wrong CA failed in {took:?}");
        assert_ne!(r.code, 0, "{}", r.stdout);
        for needle in [
            "certificate that does not verify",
            "not signed by a CA",
            "certificate-authority-data",
            &format!("127.0.0.1:{port}"),
        ] {
            assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
        }
        assert!(!r.stderr.contains("retrying"), "{}", r.stderr);
        assert!(took < Duration::from_secs(1), "took {took:?}");
        wrong.assert_untouched(&wrong_path);
    }
    // No request got past a failed handshake: only the good setup's two reads were served.
    assert_eq!(api.requests().len(), 2, "{:?}", api.requests());
    assert_eq!(signed.requests(), Vec::<String>::new());
    p.node.assert_clean();
}

/// When a PV's Node object is gone the provisioner deletes the PV without a teardown. The node
/// agent, with API access, finds the hook's volumes whose PV the API answers 404 for and
/// discards them (a log line each); a volume whose PV exists is kept; without API access
/// nothing is touched.
#[test]
fn real_agent_discards_volumes_whose_pv_is_gone() {
    if !root_or_skip("real_agent_discards_volumes_whose_pv_is_gone") {
        return;
    }
    let api = Api::start();
    api.storage_classes_from_deploy();
    let p = Provisioner::new(&api, "[agent]\norphan_after = \"1s\"\n");
    let cache = [("jobcachefs.io/cache", "maven")];
    api.pvc("ci", "kept", "jobcache-writeback", &cache, "16Mi");
    api.pvc("ci", "orphan", "jobcache-writeback", &cache, "16Mi");
    let kept = p.path(PV1, "ci", "kept");
    let orphan = p.path(PV2, "ci", "orphan");
    p.setup(&kept, 16 * MI).ok();
    p.setup(&orphan, 16 * MI).ok();
    write(&orphan, "m2/x.jar", "never committed");
    // The provisioner made PV1; PV2 was deleted with its node, the PVC too.
    api.put(
        &format!("/api/v1/persistentvolumes/{PV1}"),
        &json!({"kind": "PersistentVolume", "apiVersion": "v1", "metadata": {"name": PV1},
                "spec": {"storageClassName": "jobcache-writeback"}, "status": {"phase": "Bound"}}),
    );
    api.remove(&pvc_path("ci", "orphan"));
    std::thread::sleep(Duration::from_millis(1100));
    let agent = |kubeconfig: Option<&Path>| {
        let mut c = p.node.command();
        c.args(["agent", "--rounds", "1", "--metrics-addr", "off"]);
        c.env_remove("KUBERNETES_SERVICE_HOST");
        match kubeconfig {
            Some(k) => c.env("KUBECONFIG", k),
            None => c.env_remove("KUBECONFIG"),
        };
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    // No API access: nothing is looked for, and it says so.
    let log = agent(None);
    assert!(log.contains("no Kubernetes API access"), "{log}");
    assert_eq!(p.volumes().len(), 2);

    let before = api.requests().len();
    let log = agent(Some(&api.kubeconfig));
    assert!(
        log.contains("PV no longer exists") && log.contains(PV2),
        "{log}"
    );
    let asked: Vec<String> = api.requests()[before..].to_vec();
    assert!(
        asked.iter().any(|l| l.contains(PV1) && l.ends_with(" 200")),
        "{asked:?}"
    );
    assert!(
        asked.iter().any(|l| l.contains(PV2) && l.ends_with(" 404")),
        "{asked:?}"
    );
    let left = p.volumes();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["dir"], kept.to_str().unwrap());
    assert!(!orphan.exists(), "the orphan's folder is still there");
    assert_eq!(
        p.generation("ci", "maven"),
        0,
        "an orphan must never commit"
    );
    p.teardown(&kept, 16 * MI).ok();
    p.node.assert_clean();
}

/// `kubectl kustomize deploy/` (and deploy/examples/) renders, every object validates offline
/// against the Kubernetes schemas, and the helper pod is what the hook needs (scripts/validate-deploy
/// says what it checks). Needs no root; needs what scripts/setup installs.
#[test]
fn real_hook_unique_ids_uids_per_node_gids_per_cluster() {
    if !root_or_skip("real_hook_unique_ids_uids_per_node_gids_per_cluster") {
        return;
    }
    let (api, node_a) = world();
    let node_b = Provisioner::new(&api, "");
    let mut sc = serde_json::from_slice::<Value>(
        &std::fs::read(api.object_path(&sc_path("jobcache-writeback"))).unwrap(),
    )
    .unwrap();
    sc["metadata"]["name"] = json!("jobcache-ids");
    sc["parameters"]["jobcachefs.io/unique-ids"] = json!("true");
    api.put(&sc_path("jobcache-ids"), &sc);
    let gid_of = |p: &Provisioner, pv: &str, pvc: &str, cache: &str| -> (u32, u32, PathBuf) {
        api.pvc(
            "ci",
            pvc,
            "jobcache-ids",
            &[("jobcachefs.io/cache", cache)],
            "64Mi",
        );
        let path = p.path(pv, "ci", pvc);
        p.setup(&path, 64 * MI).ok();
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(
            md.mode() & 0o7777,
            0o2700,
            "only the volume's UID enters its root"
        );
        (md.uid(), md.gid(), path)
    };
    // The 409 of a stale resourceVersion (another node wrote first) is re-read and retried.
    api.faults(&json!({"/api/v1/namespaces/jobcachefs-system/configmaps": [409]}));
    let (u1, g1, v1) = gid_of(
        &node_a,
        "pvc-00000000-0000-0000-0000-0000000000a1",
        "a1",
        "maven",
    );
    let (u2, g2, _) = gid_of(
        &node_a,
        "pvc-00000000-0000-0000-0000-0000000000a2",
        "a2",
        "maven",
    );
    let (_, g3, _) = gid_of(
        &node_b,
        "pvc-00000000-0000-0000-0000-0000000000b1",
        "b1",
        "maven",
    );
    let (_, g4, _) = gid_of(
        &node_b,
        "pvc-00000000-0000-0000-0000-0000000000b2",
        "b2",
        "npm",
    );
    assert_ne!(u1, u2, "two live volumes of one node: different UIDs");
    assert_eq!(
        (g1, g2, g3),
        (g1, g1, g1),
        "one cache, one GID on every node"
    );
    assert_ne!(g4, g1, "another cache, another GID");
    assert!((3_000_000..4_000_000).contains(&g1) && (2_000_000..3_000_000).contains(&u1));
    let log = api.requests();
    assert!(
        log.iter()
            .any(|l| l.starts_with("POST /api/v1/namespaces/jobcachefs-system/configmaps 409")),
        "{log:?}"
    );
    // Concurrent allocations of new caches on both nodes: all different, none lost.
    let caches = ["c1", "c2", "c3", "c4", "c5", "c6"];
    let gids: Vec<u32> = std::thread::scope(|s| {
        let hs: Vec<_> = caches
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (p, api) = (if i % 2 == 0 { &node_a } else { &node_b }, &api);
                s.spawn(move || {
                    let pvc = format!("x{i}");
                    api.pvc(
                        "ci",
                        &pvc,
                        "jobcache-ids",
                        &[("jobcachefs.io/cache", c)],
                        "64Mi",
                    );
                    let path = p.path(
                        &format!("pvc-00000000-0000-0000-0000-0000000000c{i}"),
                        "ci",
                        &pvc,
                    );
                    p.setup(&path, 64 * MI).ok();
                    use std::os::unix::fs::MetadataExt;
                    std::fs::metadata(&path).unwrap().gid()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<u32> = gids.iter().copied().chain([g1, g4]).collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        caches.len() + 2,
        "every cache its own GID: {gids:?}"
    );
    let table: Value = serde_json::from_slice(
        &std::fs::read(
            api.object_path("/api/v1/namespaces/jobcachefs-system/configmaps/jobcachefs-gids"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        table["data"].as_object().unwrap().len(),
        caches.len() + 2,
        "{table}"
    );
    // The UID is free again after the delete; the GID stays the cache's.
    node_a.teardown(&v1, 64 * MI).ok();
    let (u5, g5, _) = gid_of(
        &node_a,
        "pvc-00000000-0000-0000-0000-0000000000a5",
        "a5",
        "maven",
    );
    assert_eq!((u5, g5), (u1, g1));
}

#[test]
fn deploy_manifests_render_and_validate() {
    let python = Path::new(REPO).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup (it makes the virtualenv with the pinned kubernetes-validate)",
        python.display()
    );
    let out = Command::new(&python)
        .arg(Path::new(REPO).join("scripts/validate-deploy"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("valid against Kubernetes"), "{text}");
}

#[test]
fn real_hook_scoped_pvcs_and_write_back_on_success() {
    if !root_or_skip("real_hook_scoped_pvcs_and_write_back_on_success") {
        return;
    }
    let (api, p) = world();
    // A class for CI systems that end a failed job's pod as a good one's.
    api.put(
        &sc_path("jobcache-onsuccess"),
        &json!({
            "kind": "StorageClass", "apiVersion": "storage.k8s.io/v1",
            "metadata": {"name": "jobcache-onsuccess", "uid": "7a1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6", "resourceVersion": "312"},
            "provisioner": "jobcachefs.io/local-path",
            "parameters": {"jobcachefs.io/write-back": "on-success"},
        }),
    );
    let cache = [("jobcachefs.io/cache", "npm")];
    let scoped = [
        ("jobcachefs.io/cache", "npm"),
        ("jobcachefs.io/scope", "pr-12"),
    ];
    api.pvc("ci", "main-1", "jobcache-writeback", &cache, "64Mi");
    let v = p.path(PV1, "ci", "main-1");
    p.setup(&v, 64 * MI).ok();
    write(&v, "lib/base.js", "main");
    p.teardown(&v, 64 * MI).ok();
    assert_eq!(p.generation("ci", "npm"), 1);

    // A PR build on deploy/'s read-only class with a scope: it reads the cache and commits into
    // its scope (the class's jobcachefs.io/scope-write-back), never into the cache.
    api.pvc("ci", "pr-a", "jobcache", &scoped, "64Mi");
    let v = p.path(PV2, "ci", "pr-a");
    let r = p.setup(&v, 64 * MI).ok();
    assert!(r.stdout.contains("scope pr-12"), "{}", r.stdout);
    assert_eq!(
        std::fs::read_to_string(v.join("lib/base.js")).unwrap(),
        "main"
    );
    write(&v, "lib/pr.js", "pr");
    write(&v, "lib/base.js", "pr's own base");
    api.remove(&pvc_path("ci", "pr-a"));
    let r = p.teardown(&v, 64 * MI).ok();
    assert!(r.stdout.contains("of scope pr-12"), "{}", r.stdout);
    assert_eq!(p.generation("ci", "npm"), 1, "a scoped PVC moved the cache");
    // The PR's second push sees its own work over the cache; main does not.
    api.pvc("ci", "pr-b", "jobcache", &scoped, "64Mi");
    let v = p.path(PV3, "ci", "pr-b");
    p.setup(&v, 64 * MI).ok();
    assert_eq!(std::fs::read_to_string(v.join("lib/pr.js")).unwrap(), "pr");
    assert_eq!(
        std::fs::read_to_string(v.join("lib/base.js")).unwrap(),
        "pr's own base"
    );
    api.remove(&pvc_path("ci", "pr-b"));
    p.teardown(&v, 64 * MI).ok();
    api.pvc("ci", "main-2", "jobcache", &cache, "64Mi");
    let v = p.path(PV4, "ci", "main-2");
    p.setup(&v, 64 * MI).ok();
    assert!(!v.join("lib/pr.js").exists());
    assert_eq!(
        std::fs::read_to_string(v.join("lib/base.js")).unwrap(),
        "main"
    );
    api.remove(&pvc_path("ci", "main-2"));
    p.teardown(&v, 64 * MI).ok();

    // on-success: a job that failed (no marker) is discarded, one that succeeded commits, and
    // the marker stays out of the cache.
    for (pv, name, ok) in [(PV5, "job-failed", false), (PV1, "job-ok", true)] {
        api.pvc("ci", name, "jobcache-onsuccess", &cache, "64Mi");
        let v = p.path(pv, "ci", name);
        p.setup(&v, 64 * MI).ok();
        write(&v, &format!("lib/{name}.js"), name);
        if ok {
            write(&v, ".jobcachefs-success", "");
        }
        api.remove(&pvc_path("ci", name));
        let r = p.teardown(&v, 64 * MI).ok();
        if ok {
            assert!(
                r.stdout.contains("committed as generation 2"),
                "{}",
                r.stdout
            );
        } else {
            assert!(r.stdout.contains(".jobcachefs-success"), "{}", r.stdout);
            assert_eq!(p.generation("ci", "npm"), 1);
        }
    }
    let c = p.node.create("check", "npm", &["--namespace", "ci"]);
    assert!(c.join("lib/job-ok.js").exists() && !c.join("lib/job-failed.js").exists());
    assert!(!c.join(".jobcachefs-success").exists());
    p.node.delete(&c, &[]).ok();
    p.node.assert_clean();
}
