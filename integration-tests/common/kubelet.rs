//! The kubelet stand-in for tests outside csi.rs: a running `jobcachefs csi` and a CSI client
//! over its unix socket making the calls kubelet makes for an inline ephemeral volume
//! (NodePublishVolume with the pod info kubelet adds, NodeUnpublishVolume). The same shape as
//! csi.rs's own stand-in; included with `#[path]` by the tests that use it, so that the crates
//! that do not use it carry no gRPC client.

// tonic::Status is what the stand-in returns, as kubelet gets it.
#![allow(clippy::result_large_err)]

use crate::common::Node;
use bpfman_csi::v1 as csi;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// A running `jobcachefs csi` on a node.
pub struct Plugin {
    child: Child,
    pub sock: PathBuf,
    log: PathBuf,
}

impl Plugin {
    pub fn start(node: &Node) -> Plugin {
        let sock = node.tmp.path().join("plugin/csi.sock");
        let log = node.tmp.path().join("plugin.log");
        let mut c = node.command();
        c.args([
            "csi",
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--node-id",
            "node-1",
        ])
        .stdout(Stdio::null())
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
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// kubelet's side.
pub struct Kubelet {
    rt: tokio::runtime::Runtime,
    channel: Channel,
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
