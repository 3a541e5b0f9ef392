//! The kubelet stand-in: a running `jobcachefs csi` and a CSI client over its unix socket making
//! the calls kubelet makes (NodePublishVolume with the pod info kubelet adds, NodeUnpublishVolume,
//! and whatever else a test sends through `node()` or the channel). Included with `#[path]` by
//! the tests that use it (csi.rs, runners.rs), so that the crates that do not carry no gRPC
//! client.

// tonic::Status is what the stand-in returns, as kubelet gets it; not every includer uses
// every call.
#![allow(clippy::result_large_err, dead_code)]

use crate::common::Node;
use bpfman_csi::v1 as csi;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// A running `jobcachefs csi` on a node.
pub struct Plugin {
    pub child: Child,
    pub sock: PathBuf,
    log: PathBuf,
}

impl Plugin {
    pub fn start(node: &Node) -> Plugin {
        Plugin::start_with(node, &[], &[])
    }

    /// With more arguments (`--controller`) and environment (`KUBECONFIG`).
    pub fn start_with(node: &Node, args: &[&str], env: &[(&str, &str)]) -> Plugin {
        let sock = node.tmp.path().join("plugin/csi.sock");
        // A log per start: a test that restarts the plugin reads the new one's.
        let log = node.tmp.path().join(format!(
            "plugin-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut c = node.command();
        c.args([
            "csi",
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--node-id",
            "node-1",
        ]);
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = c.spawn().expect("start jobcachefs csi");
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "jobcachefs csi exited ({st}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the plugin did not serve {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Plugin { child, sock, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits for the plugin to end.
    pub fn signal(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // SIGTERM, as kubelet's pod deletion does; SIGKILL if it has not ended in 10 s.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// kubelet's side.
pub struct Kubelet {
    pub rt: tokio::runtime::Runtime,
    pub channel: Channel,
    pods: PathBuf,
}

impl Kubelet {
    pub fn connect(plugin: &Plugin, node: &Node) -> Kubelet {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sock = plugin.sock.clone();
        let channel = rt
            .block_on(
                Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_| {
                        tokio::net::UnixStream::connect(sock.clone())
                    })),
            )
            .unwrap();
        Kubelet {
            rt,
            channel,
            pods: node.vol("pods"),
        }
    }

    pub fn node(&self) -> csi::node_client::NodeClient<Channel> {
        csi::node_client::NodeClient::new(self.channel.clone())
    }

    /// NodePublishVolume as given.
    pub fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        let mut n = self.node();
        self.rt.block_on(n.node_publish_volume(req)).map(|_| ())
    }

    /// The target kubelet gives the inline volume `vol` of the pod `uid`, its parent made.
    pub fn target(&self, uid: &str, vol: &str) -> PathBuf {
        let parent = self
            .pods
            .join(uid)
            .join("volumes/kubernetes.io~csi")
            .join(vol);
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }

    /// NodePublishVolume of an inline volume: the pod author's attributes, then the pod info
    /// kubelet adds (podInfoOnMount) and the ephemeral flag.
    pub fn publish_inline(
        &self,
        id: &str,
        target: &Path,
        namespace: &str,
        service_account: &str,
        attrs: &HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        let mut ctx = attrs.clone();
        for (k, v) in [
            ("csi.storage.k8s.io/pod.name", "build"),
            ("csi.storage.k8s.io/pod.namespace", namespace),
            ("csi.storage.k8s.io/pod.uid", id),
            ("csi.storage.k8s.io/serviceAccount.name", service_account),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ] {
            ctx.insert(k.into(), v.into());
        }
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
            volume_capability: Some(csi::VolumeCapability {
                access_type: Some(csi::volume_capability::AccessType::Mount(
                    csi::volume_capability::MountVolume::default(),
                )),
                access_mode: Some(csi::volume_capability::AccessMode {
                    mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }),
            volume_context: ctx,
            ..Default::default()
        };
        let mut n = csi::node_client::NodeClient::new(self.channel.clone());
        self.rt.block_on(n.node_publish_volume(req)).map(|_| ())
    }

    pub fn unpublish(&self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut n = csi::node_client::NodeClient::new(self.channel.clone());
        self.rt
            .block_on(n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            }))
            .map(|_| ())
    }
}
