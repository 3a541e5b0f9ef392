//! bench/run's `csi` section: kubelet's publish/unpublish calls over the plugin's socket, timed
//! one at a time and CONCURRENCY at once (not a test; bench/run prints the ratios against the
//! CLI's `volume create/delete` measured in the same run).
//!
//!   csi_bench SOCKET DIR ROUNDS CONCURRENCY
//!
//! Prints `publish_p50_ms publish_max_ms unpublish_p50_ms unpublish_max_ms` for the sequential
//! rounds, then the same for CONCURRENCY publishes at once, on one line each. Each volume is an
//! inline write-back volume of cache `bench` in namespace `bench` that writes one file.

use bpfman_csi::v1 as csi;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tonic::transport::{Channel, Endpoint};

fn request(id: &str, target: &Path) -> csi::NodePublishVolumeRequest {
    let ctx: HashMap<String, String> = [
        ("cache", "bench"),
        ("writeBack", "true"),
        ("size", "256Mi"),
        ("csi.storage.k8s.io/pod.name", "bench"),
        ("csi.storage.k8s.io/pod.namespace", "bench"),
        ("csi.storage.k8s.io/pod.uid", id),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    csi::NodePublishVolumeRequest {
        volume_id: id.to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        volume_context: ctx,
        ..Default::default()
    }
}

/// Publishes, writes a file, unpublishes; the two call times in ms.
async fn one(ch: Channel, dir: PathBuf, id: String) -> (f64, f64) {
    let mut n = csi::node_client::NodeClient::new(ch);
    let parent = dir.join(&id);
    std::fs::create_dir_all(&parent).unwrap();
    let target = parent.join("mount");
    let t = Instant::now();
    n.node_publish_volume(request(&id, &target)).await.unwrap();
    let publish = t.elapsed().as_secs_f64() * 1e3;
    std::fs::write(target.join(&id), &id).unwrap();
    let t = Instant::now();
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    let unpublish = t.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_dir(&parent);
    (publish, unpublish)
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[(v.len() - 1) / 2], v[v.len() - 1])
}

fn print(times: &[(f64, f64)]) {
    let (pp, pm) = summary(times.iter().map(|t| t.0).collect());
    let (up, um) = summary(times.iter().map(|t| t.1).collect());
    println!("{pp:.1} {pm:.1} {up:.1} {um:.1}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert_eq!(a.len(), 5, "usage: csi_bench SOCKET DIR ROUNDS CONCURRENCY");
    let sock = PathBuf::from(&a[1]);
    let dir = PathBuf::from(&a[2]);
    let rounds: usize = a[3].parse().unwrap();
    let conc: usize = a[4].parse().unwrap();
    let ch = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            tokio::net::UnixStream::connect(sock.clone())
        }))
        .await
        .unwrap();
    let mut seq = Vec::new();
    for i in 0..rounds {
        seq.push(one(ch.clone(), dir.clone(), format!("csi-seq-{i}")).await);
    }
    print(&seq);
    let tasks: Vec<_> = (0..conc)
        .map(|i| tokio::spawn(one(ch.clone(), dir.clone(), format!("csi-par-{i}"))))
        .collect();
    let mut par = Vec::new();
    for t in tasks {
        par.push(t.await.unwrap());
    }
    print(&par);
}
