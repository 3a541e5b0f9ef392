//! The CSI plugin driven the way kubelet drives it, over its real unix socket: registration
//! (GetPluginInfo, NodeGetInfo), NodeGetCapabilities, NodePublishVolume with the pod info kubelet
//! adds (the target's parent exists, the target does not), writes, NodeUnpublishVolume, retries
//! of both, the plugin SIGKILLed between them, and bad requests. Real loop devices, ext4 and
//! overlayfs underneath.

// tonic::Status is what the stand-in returns, as kubelet gets it.
#![allow(clippy::result_large_err)]

mod common;
#[path = "common/kubelet.rs"]
mod kubelet;

use bpfman_csi::v1 as csi;
use common::{root_or_skip, Node};
use kubelet::{Kubelet, Plugin};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

/// A running `jobcachefs csi`.
fn mount_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// An inline volume's publish as kubelet sends it: the author's attributes, then pod info.
fn inline(
    id: &str,
    target: &Path,
    ns: &str,
    sa: &str,
    attrs: &[(&str, &str)],
) -> csi::NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in [
        ("csi.storage.k8s.io/pod.name", "build"),
        ("csi.storage.k8s.io/pod.namespace", ns),
        (
            "csi.storage.k8s.io/pod.uid",
            "2f0e4b8a-1c2d-4e3f-8a9b-0c1d2e3f4a5b",
        ),
        ("csi.storage.k8s.io/serviceAccount.name", sa),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ] {
        ctx.insert(k.into(), v.into());
    }
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap()),
        volume_context: ctx,
        ..Default::default()
    }
}

#[test]
fn real_csi_kubelet_lifecycle_inline_trust_and_retries() {
    if !root_or_skip("real_csi_kubelet_lifecycle_inline_trust_and_retries") {
        return;
    }
    let node = Node::with_config("[csi]\ninline_write_back = [\"release/builder\"]\n");
    let mut plugin = Plugin::start(&node);
    let k = Kubelet::connect(&plugin, &node);
    // Registration, as the registrar and kubelet make it.
    let mut id = csi::identity_client::IdentityClient::new(k.channel.clone());
    let info =
        k.rt.block_on(id.get_plugin_info(csi::GetPluginInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(info.name, "csi.jobcachefs.io");
    let ni =
        k.rt.block_on(k.node().node_get_info(csi::NodeGetInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(ni.node_id, "node-1");
    assert_eq!(
        ni.accessible_topology.unwrap().segments["topology.csi.jobcachefs.io/node"],
        "node-1"
    );
    let caps =
        k.rt.block_on(
            k.node()
                .node_get_capabilities(csi::NodeGetCapabilitiesRequest {}),
        )
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 2);

    // A listed service account writes back; the publish and the unpublish are retried.
    let t1 = k.target("pod-a", "m2");
    let req = inline(
        "csi-a",
        &t1,
        "release",
        "builder",
        &[("cache", "maven"), ("writeBack", "true"), ("size", "256Mi")],
    );
    k.publish(req.clone()).unwrap();
    k.publish(req.clone()).unwrap();
    std::fs::write(t1.join("dep.jar"), "v1").unwrap();
    let mut n = k.node();
    let stats =
        k.rt.block_on(n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "csi-a".into(),
            volume_path: t1.display().to_string(),
            staging_target_path: String::new(),
        }))
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    assert!(
        stats.usage[0].total > 200 << 20 && stats.usage[0].total <= 256 << 20,
        "{:?}",
        stats.usage
    );
    assert!(!stats.volume_condition.unwrap().abnormal);
    // Another volume at the same target is refused.
    let e = k
        .publish(inline(
            "csi-other",
            &t1,
            "release",
            "builder",
            &[("cache", "maven")],
        ))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    k.unpublish("csi-a", &t1).unwrap();
    k.unpublish("csi-a", &t1).unwrap();
    assert!(!t1.exists(), "the target is removed");
    assert_eq!(generation(&node, "release", "maven"), 1);

    // The very next publish sees the commit. An unlisted service account of the same namespace
    // asking to write back gets a working volume whose changes are discarded.
    let t2 = k.target("pod-b", "m2");
    k.publish(inline(
        "csi-b",
        &t2,
        "release",
        "default",
        &[("cache", "maven"), ("writeBack", "true")],
    ))
    .unwrap();
    assert_eq!(std::fs::read_to_string(t2.join("dep.jar")).unwrap(), "v1");
    std::fs::write(t2.join("dep.jar"), "poisoned").unwrap();
    k.unpublish("csi-b", &t2).unwrap();
    assert_eq!(generation(&node, "release", "maven"), 1);
    assert!(
        plugin.log().contains("inline_write_back"),
        "{}",
        plugin.log()
    );

    // Namespace isolation: the same cache name in another namespace is another cache.
    let t3 = k.target("pod-c", "m2");
    k.publish(inline("csi-c", &t3, "pr", "builder", &[("cache", "maven")]))
        .unwrap();
    assert!(!t3.join("dep.jar").exists());

    // SIGKILL between publish and unpublish; restarted on the stale socket, the unpublish works.
    let t4 = k.target("pod-d", "m2");
    k.publish(inline(
        "csi-d",
        &t4,
        "release",
        "builder",
        &[("cache", "maven"), ("writeBack", "true")],
    ))
    .unwrap();
    std::fs::write(t4.join("dep.jar"), "v2").unwrap();
    drop(k);
    plugin.signal(nix::sys::signal::Signal::SIGKILL);
    let mut plugin = Plugin::start(&node);
    let k = Kubelet::connect(&plugin, &node);
    k.unpublish("csi-d", &t4).unwrap();
    k.unpublish("csi-c", &t3).unwrap();
    assert_eq!(generation(&node, "release", "maven"), 2);
    // An unpublish of a target that was never published.
    k.unpublish("csi-z", &k.target("pod-z", "m2")).unwrap();
    drop(k);
    let st = plugin.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        st.success(),
        "SIGTERM stops the plugin cleanly: {st:?}\n{}",
        plugin.log()
    );
    assert!(!plugin.sock.exists(), "the socket is removed");
    node.assert_clean_volumes();
}

#[test]
fn real_csi_bad_requests_get_spec_codes_and_leave_nothing() {
    if !root_or_skip("real_csi_bad_requests_get_spec_codes_and_leave_nothing") {
        return;
    }
    let node = Node::new();
    let plugin = Plugin::start(&node);
    let k = Kubelet::connect(&plugin, &node);
    let t = k.target("pod-x", "v");
    use tonic::Code::*;
    let ok = inline("csi-x", &t, "ci", "default", &[("cache", "maven")]);
    let mut cases: Vec<(csi::NodePublishVolumeRequest, tonic::Code, &str)> = Vec::new();
    let mut r = ok.clone();
    r.volume_id.clear();
    cases.push((r, InvalidArgument, "volume_id"));
    let mut r = ok.clone();
    r.target_path = "relative/mount".into();
    cases.push((r, InvalidArgument, "target_path"));
    let mut r = ok.clone();
    r.volume_capability = None;
    cases.push((r, InvalidArgument, "volume_capability"));
    let mut r = ok.clone();
    r.volume_capability.as_mut().unwrap().access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    cases.push((r, FailedPrecondition, "block"));
    let mut r = ok.clone();
    r.readonly = true;
    cases.push((r, FailedPrecondition, "readonly"));
    let mut r = ok.clone();
    r.volume_context.remove("csi.storage.k8s.io/pod.namespace");
    cases.push((r, InvalidArgument, "podInfoOnMount"));
    cases.push((
        inline("csi-x", &t, "ci", "default", &[]),
        InvalidArgument,
        "volumeAttributes.cache",
    ));
    cases.push((
        inline("csi-x", &t, "ci", "default", &[("cache", "Maven_Repo")]),
        InvalidArgument,
        "Maven_Repo",
    ));
    cases.push((
        inline(
            "csi-x",
            &t,
            "ci",
            "default",
            &[("cache", "m"), ("size", "4Xi")],
        ),
        InvalidArgument,
        "4Xi",
    ));
    cases.push((
        inline(
            "csi-x",
            &t,
            "ci",
            "default",
            &[("cache", "m"), ("size", "1Ti")],
        ),
        ResourceExhausted,
        "inline_max_size",
    ));
    cases.push((
        inline(
            "csi-x",
            &t,
            "ci",
            "default",
            &[("cache", "m"), ("writeBack", "yes")],
        ),
        InvalidArgument,
        "\"yes\"",
    ));
    cases.push((
        inline(
            "csi-x",
            &t,
            "ci",
            "default",
            &[("cache", "m"), ("cacheMode", "copy")],
        ),
        InvalidArgument,
        "copy",
    ));
    cases.push((
        inline(
            "csi-x",
            &t,
            "ci",
            "default",
            &[("cache", "m"), ("jobcachefs.io/write-back", "true")],
        ),
        InvalidArgument,
        "jobcachefs.io/write-back",
    ));
    let mut r = ok.clone();
    r.volume_context
        .insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
    cases.push((r, InvalidArgument, "jobcachefs.io/namespace"));
    for (req, code, needle) in cases {
        let e = k.publish(req).unwrap_err();
        assert_eq!(e.code(), code, "{needle}: {e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
        assert_eq!(
            node.run(&["volume", "ls", "-o", "json"]).ok().json(),
            serde_json::json!([]),
            "{needle}: a record was left"
        );
        assert!(!t.exists(), "{needle}: the target was left");
        node.assert_clean_volumes();
    }
    assert_eq!(
        node.run(&["cache", "ls", "-o", "json"]).ok().json(),
        serde_json::json!([])
    );
    let e = k.unpublish("", &t).unwrap_err();
    assert_eq!(e.code(), InvalidArgument);
    node.assert_clean();
}

/// A persistent volume's publish: the context CreateVolume returned, plus kubelet's pod info.
fn persistent(
    id: &str,
    target: &Path,
    ns: &str,
    ctx: &HashMap<String, String>,
) -> csi::NodePublishVolumeRequest {
    let mut r = inline(id, target, ns, "default", &[]);
    for (k, v) in ctx {
        r.volume_context.insert(k.clone(), v.clone());
    }
    r.volume_context
        .insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
    r
}

fn create_request(params: &[(&str, &str)], node: Option<&str>) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: "pvc-7d1c".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        accessibility_requirements: node.map(|n| csi::TopologyRequirement {
            requisite: vec![],
            preferred: vec![csi::Topology {
                segments: [("topology.csi.jobcachefs.io/node".to_string(), n.to_string())]
                    .into_iter()
                    .collect(),
            }],
        }),
        ..Default::default()
    }
}

fn generation(node: &Node, ns: &str, cache: &str) -> u64 {
    let r = node.run(&["cache", "show", cache, "--namespace", ns, "-o", "json"]);
    if r.code == 4 {
        return 0;
    }
    r.ok().json()["generation"].as_u64().unwrap()
}

#[test]
fn real_csi_controller_create_volume_and_a_pvc_reused_by_two_pods() {
    if !root_or_skip("real_csi_controller_create_volume_and_a_pvc_reused_by_two_pods") {
        return;
    }
    let api = common::api::Api::start();
    api.pvc(
        "ci",
        "gradle-cache",
        "jobcache-csi-writeback",
        &[("jobcachefs.io/cache", "gradle")],
        "1Gi",
    );
    let node = Node::new();
    let kubeconfig = api.kubeconfig.display().to_string();
    let plugin = Plugin::start_with(&node, &["--controller"], &[("KUBECONFIG", &kubeconfig)]);
    let k = Kubelet::connect(&plugin, &node);
    let mut ctl = csi::controller_client::ControllerClient::new(k.channel.clone());
    let meta = [
        ("csi.storage.k8s.io/pvc/name", "gradle-cache"),
        ("csi.storage.k8s.io/pvc/namespace", "ci"),
        ("csi.storage.k8s.io/pv/name", "pvc-7d1c"),
    ];
    let mut params = vec![
        ("jobcachefs.io/write-back", "true"),
        ("jobcachefs.io/cache-size", "2Gi"),
    ];
    params.extend_from_slice(&meta);
    let v =
        k.rt.block_on(ctl.create_volume(create_request(&params, Some("node-1"))))
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.volume_id, "pvc-7d1c");
    assert_eq!(v.capacity_bytes, 1 << 30);
    assert_eq!(
        v.accessible_topology[0].segments["topology.csi.jobcachefs.io/node"],
        "node-1"
    );
    assert_eq!(v.volume_context["jobcachefs.io/cache"], "gradle");
    assert_eq!(v.volume_context["jobcachefs.io/write-back"], "true");
    // Retried (the provisioner does): the same answer.
    let again =
        k.rt.block_on(ctl.create_volume(create_request(&params, Some("node-1"))))
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(again, v);

    // One PVC, two pods one after the other: each starts from the newest generation and
    // commits at its end.
    let t1 = k.target("pod-1", "pvc-7d1c");
    k.publish(persistent(&v.volume_id, &t1, "ci", &v.volume_context))
        .unwrap();
    std::fs::write(t1.join("one"), "1").unwrap();
    k.unpublish(&v.volume_id, &t1).unwrap();
    assert_eq!(generation(&node, "ci", "gradle"), 1);
    let t2 = k.target("pod-2", "pvc-7d1c");
    k.publish(persistent(&v.volume_id, &t2, "ci", &v.volume_context))
        .unwrap();
    assert_eq!(std::fs::read_to_string(t2.join("one")).unwrap(), "1");
    std::fs::write(t2.join("two"), "2").unwrap();
    k.unpublish(&v.volume_id, &t2).unwrap();
    assert_eq!(generation(&node, "ci", "gradle"), 2);
    let show = node.run(&["volume", "ls", "-o", "json"]).ok().json();
    assert_eq!(show, serde_json::json!([]));
    let history = node
        .run(&[
            "cache",
            "history",
            "gradle",
            "--namespace",
            "ci",
            "-o",
            "json",
        ])
        .ok()
        .json();
    let text = history.to_string();
    assert!(
        text.contains("gradle-cache") && text.contains("node-1"),
        "{text}"
    );
    // The PV's context serves only pods of its own namespace.
    let e = k
        .publish(persistent(
            &v.volume_id,
            &k.target("pod-3", "pvc-7d1c"),
            "other",
            &v.volume_context,
        ))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("caches stay per namespace"),
        "{}",
        e.message()
    );

    use tonic::Code::*;
    for (req, code, needle) in [
        (
            create_request(&params[..2], Some("node-1")),
            InvalidArgument,
            "--extra-create-metadata",
        ),
        (
            create_request(&params, None),
            InvalidArgument,
            "WaitForFirstConsumer",
        ),
        (
            create_request(
                &[("jobcachefs.io/write-back", "yes"), meta[0], meta[1]],
                Some("node-1"),
            ),
            InvalidArgument,
            "\"yes\"",
        ),
        (
            create_request(
                &[("csi.storage.k8s.io/pvc/name", "gone"), meta[1]],
                Some("node-1"),
            ),
            NotFound,
            "gone",
        ),
    ] {
        let e = k.rt.block_on(ctl.create_volume(req)).unwrap_err();
        assert_eq!(e.code(), code, "{needle}: {e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    k.rt.block_on(ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: Default::default(),
    }))
    .unwrap();
    node.assert_clean_volumes();
}

#[test]
fn real_csi_sixteen_pods_publish_on_one_cache_at_once() {
    if !root_or_skip("real_csi_sixteen_pods_publish_on_one_cache_at_once") {
        return;
    }
    let node = Node::with_config("[csi]\ninline_write_back = [\"ci\"]\n");
    let plugin = Plugin::start(&node);
    let k = Kubelet::connect(&plugin, &node);
    let targets: Vec<PathBuf> = (0..16)
        .map(|i| k.target(&format!("pod-{i}"), "cache"))
        .collect();
    let calls: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut n = k.node();
            let req = inline(
                &format!("csi-{i}"),
                t,
                "ci",
                "default",
                &[("cache", "npm"), ("writeBack", "true"), ("size", "128Mi")],
            );
            async move { n.node_publish_volume(req).await }
        })
        .collect();
    for r in k.rt.block_on(futures_join(calls)) {
        r.unwrap();
    }
    for (i, t) in targets.iter().enumerate() {
        std::fs::write(t.join(format!("pkg-{i}")), format!("{i}")).unwrap();
    }
    let calls: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut n = k.node();
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: format!("csi-{i}"),
                target_path: t.display().to_string(),
            };
            async move { n.node_unpublish_volume(req).await }
        })
        .collect();
    for r in k.rt.block_on(futures_join(calls)) {
        r.unwrap();
    }
    assert_eq!(
        generation(&node, "ci", "npm"),
        16,
        "every pod's unpublish committed"
    );
    let t = k.target("pod-check", "cache");
    k.publish(inline(
        "csi-check",
        &t,
        "ci",
        "default",
        &[("cache", "npm")],
    ))
    .unwrap();
    for i in 0..16 {
        assert_eq!(
            std::fs::read_to_string(t.join(format!("pkg-{i}"))).unwrap(),
            format!("{i}")
        );
    }
    k.unpublish("csi-check", &t).unwrap();
    // The agent's /metrics counts them in its histograms.
    let engine = jobcachefs::Engine::open(&node.state(), Default::default()).unwrap();
    let text = jobcachefs::sync::agent::metrics(&engine, 0);
    assert!(
        text.contains("jobcachefs_csi_publish_seconds_count 17"),
        "{text}"
    );
    assert!(
        text.contains("jobcachefs_csi_unpublish_seconds_count 17"),
        "{text}"
    );
    assert!(
        text.contains("jobcachefs_csi_publish_seconds_bucket{le=\"+Inf\"} 17"),
        "{text}"
    );
    node.assert_clean_volumes();
}

/// Awaits every future, concurrently, in order.
async fn futures_join<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn real_csi_clone_mode_inline_volume_holds_buildah_storage() {
    if !root_or_skip("real_csi_clone_mode_inline_volume_holds_buildah_storage") {
        return;
    }
    let node = Node::with_config(
        "clone_pool_size = \"4Gi\"\ndefault_cache_size = \"1Gi\"\n[csi]\ninline_write_back = [\"ci/builder\"]\n",
    );
    let plugin = Plugin::start(&node);
    let k = Kubelet::connect(&plugin, &node);
    let attrs = [
        ("cache", "containers"),
        ("cacheMode", "clone"),
        ("writeBack", "true"),
        ("size", "1Gi"),
    ];
    let buildah = |graphroot: &Path, args: &[&str]| -> std::process::Output {
        let run = node.tmp.path().join("buildah-run");
        std::fs::create_dir_all(&run).unwrap();
        let conf = node.tmp.path().join("storage.conf");
        std::fs::write(
            &conf,
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                graphroot.display(),
                run.display()
            ),
        )
        .unwrap();
        std::process::Command::new("buildah")
            .env("CONTAINERS_STORAGE_CONF", &conf)
            .args(args)
            .output()
            .expect("buildah runs (scripts/setup installs it)")
    };
    let t1 = k.target("pod-1", "storage");
    k.publish(inline("csi-1", &t1, "ci", "builder", &attrs))
        .unwrap();
    let ctx = node.tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY app /app\n").unwrap();
    std::fs::write(ctx.join("app"), "main").unwrap();
    let out = buildah(
        &t1,
        &[
            "build",
            "--storage-driver",
            "overlay",
            "-t",
            "localhost/csi-test:1",
            ctx.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "buildah build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    k.unpublish("csi-1", &t1).unwrap();
    assert_eq!(generation(&node, "ci", "containers"), 1);
    let t2 = k.target("pod-2", "storage");
    k.publish(inline("csi-2", &t2, "ci", "builder", &attrs))
        .unwrap();
    let images = buildah(&t2, &["images", "--format", "{{.Name}}:{{.Tag}}"]);
    assert!(
        String::from_utf8_lossy(&images.stdout).contains("localhost/csi-test:1"),
        "the next pod finds the image: {}{}",
        String::from_utf8_lossy(&images.stdout),
        String::from_utf8_lossy(&images.stderr)
    );
    k.unpublish("csi-2", &t2).unwrap();
    node.assert_clean_volumes();
}

/// GetCapacity as the csi-provisioner beside the plugin (`--node-deployment --enable-capacity`)
/// asks it for its node: what disk admission would still admit, following the volumes as they
/// come and go, capped by the class's max-volume-size; another node's capacity is not known
/// here and is refused with the fix.
#[test]
fn real_csi_get_capacity_follows_disk_admission() {
    if !root_or_skip("real_csi_get_capacity_follows_disk_admission") {
        return;
    }
    let node = Node::with_config("[csi]\ninline_max_size = \"64Gi\"\n");
    let plugin = Plugin::start_with(&node, &["--controller"], &[]);
    let k = Kubelet::connect(&plugin, &node);
    let mut ctl = csi::controller_client::ControllerClient::new(k.channel.clone());
    let caps =
        k.rt.block_on(ctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(caps.capabilities.len(), 2, "{caps:?}");
    let ask = |ctl: &mut csi::controller_client::ControllerClient<Channel>,
               node_name: &str,
               params: &[(&str, &str)]| {
        k.rt.block_on(
            ctl.get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![mount_cap()],
                parameters: params
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
                accessible_topology: Some(csi::Topology {
                    segments: [(
                        "topology.csi.jobcachefs.io/node".to_string(),
                        node_name.to_string(),
                    )]
                    .into(),
                }),
            }),
        )
        .map(|r| r.into_inner())
    };
    let before = ask(&mut ctl, "node-1", &[]).unwrap();
    assert!(before.available_capacity > 0, "{before:?}");
    assert_eq!(before.maximum_volume_size, Some(before.available_capacity));
    // A volume promises its size (sparse: it allocates next to nothing yet), and the
    // capacity falls by it; other writers on this filesystem move it a little.
    let size = (before.available_capacity / 2).min(16 << 30);
    let target = k.target("pod-cap", "cache");
    k.publish(inline(
        "csi-cap",
        &target,
        "ci",
        "default",
        &[("cache", "npm"), ("size", &size.to_string())],
    ))
    .unwrap();
    let during = ask(&mut ctl, "node-1", &[]).unwrap();
    let fell = before.available_capacity - during.available_capacity;
    assert!(
        (fell - size).abs() < 512 << 20,
        "capacity fell by {fell}, the volume promised {size}"
    );
    // What is left is what admission admits: a volume above it is refused.
    let too_big = during.available_capacity + (1 << 30);
    let t2 = k.target("pod-cap2", "cache");
    let refused = k
        .publish(inline(
            "csi-cap2",
            &t2,
            "ci",
            "default",
            &[("cache", "npm"), ("size", &too_big.to_string())],
        ))
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    k.unpublish("csi-cap", &target).unwrap();
    let after = ask(&mut ctl, "node-1", &[]).unwrap();
    assert!(
        (after.available_capacity - before.available_capacity).abs() < 512 << 20,
        "before {before:?}, after {after:?}"
    );
    // The class's max-volume-size caps the largest volume, not the total.
    let capped = ask(
        &mut ctl,
        "node-1",
        &[("jobcachefs.io/max-volume-size", "1Gi")],
    )
    .unwrap();
    assert_eq!(capped.maximum_volume_size, Some(1 << 30));
    let bad = ask(
        &mut ctl,
        "node-1",
        &[("jobcachefs.io/max-volume-size", "lots")],
    )
    .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let other = ask(&mut ctl, "node-2", &[]).unwrap_err();
    assert_eq!(other.code(), tonic::Code::FailedPrecondition);
    assert!(other.message().contains("--node-deployment"), "{other:?}");
    drop(k);
    drop(plugin);
    node.assert_clean();
}

fn scope_layers(node: &Node, ns: &str, cache: &str, scope: &str) -> u64 {
    let r = node.run(&["cache", "show", cache, "--namespace", ns, "-o", "json"]);
    r.ok().json()["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scope"] == scope)
        .map_or(0, |s| s["layers"].as_u64().unwrap())
}

#[test]
fn real_csi_scopes_and_on_success_inline_and_through_a_pvc() {
    if !root_or_skip("real_csi_scopes_and_on_success_inline_and_through_a_pvc") {
        return;
    }
    let api = common::api::Api::start();
    api.pvc(
        "ci",
        "pr-9-cache",
        "jobcache-csi",
        &[
            ("jobcachefs.io/cache", "gradle"),
            ("jobcachefs.io/scope", "pr-9"),
        ],
        "1Gi",
    );
    // Trusted: only ci/release writes into caches; every account may write into a scope.
    let node = Node::with_config("[csi]\ninline_write_back = [\"ci/release\"]\n");
    let kubeconfig = api.kubeconfig.display().to_string();
    let plugin = Plugin::start_with(&node, &["--controller"], &[("KUBECONFIG", &kubeconfig)]);
    let k = Kubelet::connect(&plugin, &node);
    let run = |id: &str, sa: &str, attrs: &[(&str, &str)], files: &[&str]| {
        let t = k.target(id, "cache");
        k.publish(inline(id, &t, "ci", sa, attrs)).unwrap();
        for f in files {
            std::fs::write(t.join(f), id).unwrap();
        }
        let seen: Vec<String> = std::fs::read_dir(&t)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        k.unpublish(id, &t).unwrap();
        seen
    };
    let gradle = [("cache", "gradle")];
    // on-success, trusted: no marker → discarded; the marker → committed, and not in the cache.
    let on_success = [("cache", "gradle"), ("writeBack", "on-success")];
    run("fail", "release", &on_success, &["failed.jar"]);
    assert_eq!(generation(&node, "ci", "gradle"), 0);
    assert!(
        plugin.log().contains(".jobcachefs-success"),
        "{}",
        plugin.log()
    );
    run(
        "ok",
        "release",
        &on_success,
        &["main.jar", ".jobcachefs-success"],
    );
    assert_eq!(generation(&node, "ci", "gradle"), 1);
    let seen = run("look", "default", &gradle, &[]);
    assert!(
        seen.contains(&"main.jar".into()) && !seen.contains(&"failed.jar".into()),
        "{seen:?}"
    );
    assert!(!seen.contains(&".jobcachefs-success".into()), "{seen:?}");

    // An untrusted account with a scope writes into the scope (inline_scope_write_back
    // defaults to everyone), without one it only reads; a trusted one with a scope also
    // writes into the scope, never the cache.
    let pr = [
        ("cache", "gradle"),
        ("scope", "pr-9"),
        ("writeBack", "true"),
    ];
    run("pr-1", "default", &pr, &["pr.jar"]);
    assert_eq!(scope_layers(&node, "ci", "gradle", "pr-9"), 1);
    run("pr-2", "release", &pr, &["pr2.jar"]);
    assert_eq!(scope_layers(&node, "ci", "gradle", "pr-9"), 2);
    run(
        "noscope",
        "default",
        &[("cache", "gradle"), ("writeBack", "true")],
        &["x.jar"],
    );
    assert_eq!(
        generation(&node, "ci", "gradle"),
        1,
        "a scope or an untrusted pod moved the cache"
    );
    let seen = run(
        "pr-3",
        "default",
        &[("cache", "gradle"), ("scope", "pr-9")],
        &[],
    );
    for f in ["main.jar", "pr.jar", "pr2.jar"] {
        assert!(seen.contains(&f.to_string()), "{f}: {seen:?}");
    }
    assert!(!seen.contains(&"x.jar".to_string()));
    let seen = run("main-view", "default", &gradle, &[]);
    assert!(!seen.contains(&"pr.jar".to_string()), "{seen:?}");
    // A scope on a clone cache is refused with INVALID_ARGUMENT naming why.
    let t = k.target("img", "cache");
    let e = k
        .publish(inline(
            "img",
            &t,
            "ci",
            "default",
            &[("cache", "img"), ("cacheMode", "clone"), ("scope", "pr-9")],
        ))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("clone caches have no scopes"),
        "{}",
        e.message()
    );

    // A PVC through the controller: its scope annotation and deploy/csi's read-only class
    // (scope-write-back) make a PV whose pods write into the scope.
    let mut ctl = csi::controller_client::ControllerClient::new(k.channel.clone());
    let params = [
        ("jobcachefs.io/write-back", "false"),
        ("jobcachefs.io/scope-write-back", "on-success"),
        ("csi.storage.k8s.io/pvc/name", "pr-9-cache"),
        ("csi.storage.k8s.io/pvc/namespace", "ci"),
        ("csi.storage.k8s.io/pv/name", "pvc-9"),
    ];
    let v =
        k.rt.block_on(ctl.create_volume(create_request(&params, Some("node-1"))))
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.volume_context["jobcachefs.io/scope"], "pr-9");
    assert_eq!(v.volume_context["jobcachefs.io/write-back"], "on-success");
    for (pod, marker) in [("p1", false), ("p2", true)] {
        let t = k.target(pod, "pvc-9");
        k.publish(persistent(&v.volume_id, &t, "ci", &v.volume_context))
            .unwrap();
        assert!(t.join("pr.jar").exists(), "the PVC's pod reads the scope");
        std::fs::write(t.join(format!("{pod}.jar")), pod).unwrap();
        if marker {
            std::fs::write(t.join(".jobcachefs-success"), "").unwrap();
        }
        k.unpublish(&v.volume_id, &t).unwrap();
    }
    assert_eq!(
        scope_layers(&node, "ci", "gradle", "pr-9"),
        3,
        "only the pod with the marker"
    );
    assert_eq!(generation(&node, "ci", "gradle"), 1);
    node.assert_clean_volumes();
}

/// NodeGetVolumeStats of one volume among many: each volume's bytes are its own, and a volume
/// record elsewhere on the node that cannot be read at all (here a directory where its
/// volume.json should be; on a node, a bad block) does not turn a live volume into a missing
/// one. The stats read the asked volume's record alone.
#[test]
fn real_csi_volume_stats_of_one_volume_among_many() {
    if !root_or_skip("real_csi_volume_stats_of_one_volume_among_many") {
        return;
    }
    let node = Node::new();
    let plugin = Plugin::start(&node);
    let k = Kubelet::connect(&plugin, &node);
    const N: usize = 8;
    let targets: Vec<PathBuf> = (0..N)
        .map(|i| k.target(&format!("pod-{i}"), "cache"))
        .collect();
    for (i, t) in targets.iter().enumerate() {
        k.publish(inline(
            &format!("csi-{i}"),
            t,
            "ci",
            "default",
            &[("cache", "npm"), ("size", "128Mi")],
        ))
        .unwrap();
        // Volume i holds i MiB of its own.
        let f = std::fs::File::create(t.join("blob")).unwrap();
        std::io::Write::write_all(&mut &f, &vec![0x5a; i << 20]).unwrap();
        f.sync_all().unwrap();
    }
    let used = |i: usize| -> i64 {
        let mut n = k.node();
        let s =
            k.rt.block_on(n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: format!("csi-{i}"),
                volume_path: targets[i].display().to_string(),
                staging_target_path: String::new(),
            }))
            .unwrap_or_else(|e| panic!("stats of csi-{i}: {e:?}"))
            .into_inner();
        assert!(!s.volume_condition.unwrap().abnormal);
        s.usage[0].used
    };
    let check = |when: &str| {
        let base = used(0);
        for i in 1..N {
            let own = used(i) - base;
            let want = (i << 20) as i64;
            assert!(
                (want..want + (1 << 20)).contains(&own),
                "{when}: csi-{i} uses {own} bytes more than an empty volume, it holds {want}"
            );
        }
    };
    check("all records readable");
    let unreadable = node.state().join("volumes/00000000000000000000");
    std::fs::create_dir_all(unreadable.join("volume.json")).unwrap();
    check("one record elsewhere unreadable");
    // The stats of a volume asked by another volume's id are still refused.
    let mut n = k.node();
    let e =
        k.rt.block_on(n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "csi-1".into(),
            volume_path: targets[2].display().to_string(),
            staging_target_path: String::new(),
        }))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    std::fs::remove_dir_all(&unreadable).unwrap();
    for (i, t) in targets.iter().enumerate() {
        k.unpublish(&format!("csi-{i}"), t).unwrap();
    }
    node.assert_clean_volumes();
}

/// A debugging tool's client: gRPC's C-core (grpcio, pinned in .venv by scripts/setup), with
/// the `:authority` it sends by default over a unix socket — the socket path, %-encoded, which
/// h2 alone refuses (RST_STREAM PROTOCOL_ERROR). Three calls on one channel, so the later ones
/// name that authority through the connection's HPACK table. The requests are empty messages
/// and the answers are checked as protobuf bytes: no stubs needed.
#[test]
fn real_csi_a_grpcio_client_with_its_default_authority_is_served() {
    if !root_or_skip("real_csi_a_grpcio_client_with_its_default_authority_is_served") {
        return;
    }
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup (it makes the virtualenv with the pinned grpcio)",
        python.display()
    );
    let node = Node::new();
    let plugin = Plugin::start(&node);
    let script = r#"
import sys, grpc
with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
    for method in sys.argv[2:]:
        # No (de)serializers: the request and the answer are raw protobuf bytes.
        print(channel.unary_unary(method)(b"", timeout=20).hex())
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&plugin.sock)
        .args([
            "/csi.v1.Identity/GetPluginInfo",
            "/csi.v1.Identity/GetPluginInfo",
            "/csi.v1.Node/NodeGetInfo",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "grpcio's calls failed ({}):\n{stderr}\nplugin log:\n{}",
        out.status,
        plugin.log()
    );
    let answers: Vec<Vec<u8>> = stdout
        .lines()
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect();
    assert_eq!(answers.len(), 3, "{stdout}");
    let has = |a: &[u8], s: &str| a.windows(s.len()).any(|w| w == s.as_bytes());
    for a in &answers[..2] {
        assert!(has(a, "csi.jobcachefs.io"), "GetPluginInfo answered {a:x?}");
    }
    assert!(
        has(&answers[2], "node-1"),
        "NodeGetInfo answered {:x?}",
        answers[2]
    );
}
