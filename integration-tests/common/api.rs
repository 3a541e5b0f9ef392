//! The Kubernetes API stand-in of the hook and CSI tests: integration-tests/k8s-api/server.py,
//! HTTPS with a CA of the test's, reached through a KUBECONFIG, serving recorded objects.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The bearer token the stand-in accepts.
pub const TOKEN: &str = "test-token-of-the-provisioner-sa";

/// The API stand-in: a python HTTPS server over a directory of recorded objects.
pub struct Api {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub kubeconfig: PathBuf,
}

pub fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run openssl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA of the test's: `<name>.key` and `<name>.crt` in `dir`, subject CN `cn`.
pub fn make_ca(dir: &Path, name: &str, cn: &str) {
    let (key, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.crt"),
        format!("/CN={cn}"),
    );
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &crt,
            "-days", "2", "-subj", &subj,
        ],
        dir,
    );
}

/// A server certificate `<out>.crt` (key `<out>.key`) for `san` (`IP:127.0.0.1,DNS:…`), signed
/// by the CA `<ca>.crt` that [`make_ca`] made in `dir`.
pub fn sign_server_cert(dir: &Path, ca: &str, out: &str, cn: &str, san: &str) {
    let (key, csr, crt) = (
        format!("{out}.key"),
        format!("{out}.csr"),
        format!("{out}.crt"),
    );
    let subj = format!("/CN={cn}");
    openssl(
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj,
        ],
        dir,
    );
    std::fs::write(
        dir.join(format!("{out}.ext")),
        format!("subjectAltName={san}\n"),
    )
    .unwrap();
    let (ca_crt, ca_key, ext) = (
        format!("{ca}.crt"),
        format!("{ca}.key"),
        format!("{out}.ext"),
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
        dir,
    );
}

/// How the stand-in's certificate is made.
#[derive(Clone, Copy, PartialEq)]
pub enum ServerCert {
    /// Signed by a CA of the test's (the kubeconfig's CA).
    SignedByCa,
    /// Self-signed (a CA certificate itself, as `openssl req -x509` makes it) and given to the
    /// client as the CA, as single-node clusters and kubeadm-less setups often do.
    SelfSigned,
}

impl Api {
    pub fn start() -> Api {
        Api::start_with(ServerCert::SignedByCa)
    }

    pub fn start_with(cert: ServerCert) -> Api {
        let dir = tempfile::Builder::new()
            .prefix("jcfs-api-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        if cert == ServerCert::SelfSigned {
            openssl(
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=kube-apiserver",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                ],
                d,
            );
            std::fs::copy(d.join("server.crt"), d.join("ca.crt")).unwrap();
        }
        // A CA of our own and a server certificate for 127.0.0.1 signed by it.
        if cert == ServerCert::SignedByCa {
            make_ca(d, "ca", "jobcachefs-test-ca");
            sign_server_cert(
                d,
                "ca",
                "server",
                "kube-apiserver",
                "IP:127.0.0.1,DNS:localhost",
            );
        }
        let root = d.join("root");
        std::fs::create_dir(&root).unwrap();
        let child = Command::new("python3")
            .arg(Path::new(REPO).join("integration-tests/k8s-api/server.py"))
            .args(["--root", root.to_str().unwrap()])
            .args(["--cert", d.join("server.crt").to_str().unwrap()])
            .args(["--key", d.join("server.key").to_str().unwrap()])
            .args(["--token", TOKEN])
            .args(["--port-file", d.join("port").to_str().unwrap()])
            .spawn()
            .expect("start python3 (scripts/setup installs it)");
        let mut api = Api {
            dir,
            child,
            kubeconfig: PathBuf::new(),
        };
        let started = Instant::now();
        while !api.dir.path().join("port").exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the API stand-in did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let port = std::fs::read_to_string(api.dir.path().join("port")).unwrap();
        api.kubeconfig = api.write_kubeconfig(&format!("https://127.0.0.1:{port}"), TOKEN);
        api
    }

    /// A kubeconfig for `server` with `token`, trusting the test CA.
    pub fn write_kubeconfig(&self, server: &str, token: &str) -> PathBuf {
        self.write_kubeconfig_with_ca(server, token, &self.dir.path().join("ca.crt"))
    }

    /// A kubeconfig for `server` with `token`, trusting the CA in the PEM file `ca`.
    pub fn write_kubeconfig_with_ca(&self, server: &str, token: &str, ca: &Path) -> PathBuf {
        use base64::Engine as _;
        let ca = std::fs::read(ca).unwrap();
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        let path = self.dir.path().join(format!(
            "kubeconfig-{}-{}",
            server.len() + token.len(),
            ca.len()
        ));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: provisioner\nusers:\n- name: provisioner\n  user:\n    token: {token}\n"
            ),
        )
        .unwrap();
        path
    }

    pub fn object_path(&self, api_path: &str) -> PathBuf {
        self.dir
            .path()
            .join("root")
            .join(format!("{}.json", api_path.trim_start_matches('/')))
    }

    pub fn put(&self, api_path: &str, obj: &Value) {
        let p = self.object_path(api_path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, serde_json::to_vec_pretty(obj).unwrap()).unwrap();
    }

    pub fn remove(&self, api_path: &str) {
        std::fs::remove_file(self.object_path(api_path)).unwrap();
    }

    pub fn faults(&self, faults: &Value) {
        std::fs::write(self.dir.path().join("root/faults.json"), faults.to_string()).unwrap();
    }

    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("root/requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Records a PVC as the API returns it while its volume is being provisioned.
    pub fn pvc(
        &self,
        ns: &str,
        name: &str,
        class: &str,
        annotations: &[(&str, &str)],
        storage: &str,
    ) {
        let mut ann = serde_json::Map::new();
        ann.insert(
            "volume.kubernetes.io/storage-provisioner".into(),
            "jobcachefs.io/local-path".into(),
        );
        ann.insert("volume.kubernetes.io/selected-node".into(), "node-1".into());
        for (k, v) in annotations {
            ann.insert(k.to_string(), json!(v));
        }
        self.put(
            &pvc_path(ns, name),
            &json!({
                "kind": "PersistentVolumeClaim",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "uid": format!("0b7a3c0e-5b2f-4a55-9d2c-{:012x}", name.len() * 7919 + ns.len()),
                    "resourceVersion": "48213",
                    "creationTimestamp": "2026-11-24T10:00:00Z",
                    "annotations": ann,
                    "finalizers": ["kubernetes.io/pvc-protection"],
                    "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Pod", "name": format!("{name}-pod"),
                        "uid": "5f0e4b8a-1c2d-4e3f-8a9b-0c1d2e3f4a5b",
                        "controller": true, "blockOwnerDeletion": true
                    }],
                    "managedFields": []
                },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": storage}},
                    "storageClassName": class,
                    "volumeMode": "Filesystem"
                },
                "status": {"phase": "Pending"}
            }),
        );
    }

    /// Records deploy/'s StorageClasses as the API returns them.
    pub fn storage_classes_from_deploy(&self) {
        let text =
            std::fs::read_to_string(Path::new(REPO).join("deploy/storageclasses.yaml")).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut sc: Value = serde::Deserialize::deserialize(doc).unwrap();
            assert_eq!(sc["kind"], "StorageClass");
            let name = sc["metadata"]["name"].as_str().unwrap().to_string();
            sc["metadata"]["uid"] = json!("9d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6");
            sc["metadata"]["resourceVersion"] = json!("311");
            sc["metadata"]["creationTimestamp"] = json!("2026-11-20T08:00:00Z");
            self.put(&sc_path(&name), &sc);
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pvc_path(ns: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}")
}

pub fn sc_path(name: &str) -> String {
    format!("/apis/storage.k8s.io/v1/storageclasses/{name}")
}
