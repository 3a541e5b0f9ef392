//! A real OCI registry for the sync and placement tests: Debian's docker-registry on 127.0.0.1
//! on a free port with its own storage, stopped (SIGTERM, then waited for) when dropped. Its
//! access log is the witness of what was uploaded and downloaded.

#![allow(dead_code)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running docker-registry.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub port: u16,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("jcfs-registry-")
            .tempdir()
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: jobcachefs-test-secret\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = spawn(dir.path(), port);
        Registry { dir, child, port }
    }

    /// Stops the registry (SIGTERM, waited for): pushes and pulls fail until [`Registry::start_again`].
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// Starts a stopped registry again on the same port and storage.
    pub fn start_again(&mut self) {
        self.child = spawn(self.dir.path(), self.port);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap()
    }

    /// Access log lines added since `mark` (a previous `log().len()`).
    pub fn log_since(&self, mark: usize) -> String {
        self.log()[mark..].to_string()
    }

    /// The node config for this registry.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[[registry]]\nimage = \"127.0.0.1:{}/caches\"\ntls_verify = false\ntimeout = \"60s\"\n{extra}",
            self.port
        )
    }

    pub fn image(&self, ns: &str, name: &str) -> String {
        format!("127.0.0.1:{}/caches/{ns}/{name}", self.port)
    }

    /// The layer digests of `image:latest`.
    pub fn layers(&self, image: &str) -> Vec<String> {
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{image}:latest"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Runs docker-registry with the config in `dir` and waits until it listens on `port`.
fn spawn(dir: &std::path::Path, port: u16) -> Child {
    // The combined-format access log goes to stdout, the application log to stderr (appended:
    // a restarted registry keeps the log of the one before).
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("access.log"))
        .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start docker-registry (scripts/setup installs it)");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "registry did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

impl Drop for Registry {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
