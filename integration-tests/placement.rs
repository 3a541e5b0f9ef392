//! Placement against the API stand-in (real HTTPS): agents on two nodes label their own Nodes
//! with the caches they hold (after a commit, an import, a `cache rm`, a wiped state dir, a
//! conflicting write), `cache where` reads the cluster view, and the webhook, over real TLS,
//! answers AdmissionReviews for every Pod shape with JSON Patches that are applied here and
//! the resulting Pods checked.

mod common;

use base64::Engine as _;
use common::api::{make_ca, sign_server_cert, Api};
use common::registry::Registry;
use common::{root_or_skip, sh, Node};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name the API server verifies the webhook's certificate for (deploy/webhook's Service).
const SERVICE_HOST: &str = "jobcachefs-webhook.jobcachefs-system.svc";
const LONG_NS: &str = "platform-team-with-a-rather-long-name";
const LONG_NAME: &str = "gradle-wrapper-and-dependencies-cache";

fn node_path(name: &str) -> String {
    format!("/api/v1/nodes/{name}")
}

fn put_node(api: &Api, name: &str, labels: Value) {
    api.put(
        &node_path(name),
        &json!({"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "resourceVersion": "100", "labels": labels},
            "spec": {}, "status": {}}),
    );
}

fn read_node(api: &Api, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(api.object_path(&node_path(name))).unwrap()).unwrap()
}

fn cache_labels(node: &Value) -> Vec<(String, String)> {
    node["metadata"]["labels"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("cache.jobcachefs.io/"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

fn long_key() -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{LONG_NS}.{LONG_NAME}").as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("cache.jobcachefs.io/h-{}", &hex[..40])
}

/// Commits `file` into cache `ns/cache` on `n`.
fn commit(n: &Node, ns: &str, cache: &str, file: &str) {
    let v = n.create(
        &format!("v-{file}"),
        cache,
        &["--namespace", ns, "--size", "64Mi", "--write-back"],
    );
    sh(&format!("echo {file} > {}/{file}", v.display()));
    let r = n.delete(&v, &[]).ok();
    assert!(r.stdout.contains("committed"), "{}", r.stdout);
}

/// One agent round on `n` as Node `name`, with the API.
fn agent_once(n: &Node, api: &Api, name: &str) -> common::Run {
    let kc = api.kubeconfig.display().to_string();
    let args = [
        "agent",
        "--rounds",
        "1",
        "--metrics-addr",
        "off",
        "--node-name",
        name,
    ];
    n.run_env(&args, &[("KUBECONFIG", &kc)])
}

/// One agent round on `n` as Node `name`; the PATCHes it sent.
fn agent_round(n: &Node, api: &Api, name: &str) -> usize {
    let before = api.requests().len();
    agent_once(n, api, name).ok();
    api.requests()[before..]
        .iter()
        .filter(|l| l.starts_with("PATCH ") && l.ends_with(" 200"))
        .count()
}

#[test]
fn real_placement_agents_label_their_own_nodes_and_cache_where_reads_them() {
    if !root_or_skip("real_placement_agents_label_their_own_nodes_and_cache_where_reads_them") {
        return;
    }
    let api = Api::start();
    put_node(&api, "n1", json!({"kubernetes.io/hostname": "n1"}));
    // n2's state was wiped (a reimaged node): its old label must go.
    put_node(
        &api,
        "n2",
        json!({"kubernetes.io/hostname": "n2", "cache.jobcachefs.io/ci.gone": "4"}),
    );
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));

    // A commit on n1, and a cache whose label name would pass 63 characters.
    commit(&a, "ci", "maven", "one");
    commit(&a, LONG_NS, LONG_NAME, "long");
    assert_eq!(agent_round(&a, &api, "n1"), 1, "one PATCH for the changes");
    let n1 = read_node(&api, "n1");
    let mut want = vec![
        ("cache.jobcachefs.io/ci.maven".to_string(), "1".to_string()),
        (long_key(), "1".to_string()),
    ];
    want.sort();
    assert_eq!(cache_labels(&n1), want);
    assert_eq!(n1["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
    let note: Value = serde_json::from_str(
        n1["metadata"]["annotations"]["jobcachefs.io/caches"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(note["ci/maven"]["generation"], 1);
    assert!(note["ci/maven"]["allocated"].as_u64().unwrap() > 0);
    assert_eq!(note["ci/maven"]["mode"], "overlay");

    // The agent pushed the commits; n2 imports maven and says so, and only of itself.
    let n1_version = read_node(&api, "n1")["metadata"]["resourceVersion"].clone();
    b.run(&["cache", "import", "maven", "--namespace", "ci"])
        .ok();
    let b_gen = b
        .run(&["cache", "show", "maven", "--namespace", "ci", "-o", "json"])
        .ok()
        .json()["generation"]
        .as_u64()
        .unwrap();
    assert_eq!(agent_round(&b, &api, "n2"), 1);
    assert_eq!(
        cache_labels(&read_node(&api, "n2")),
        [(
            "cache.jobcachefs.io/ci.maven".to_string(),
            b_gen.to_string()
        )]
    );
    assert_eq!(
        read_node(&api, "n1")["metadata"]["resourceVersion"],
        n1_version,
        "n2's agent wrote to n1"
    );
    // Nothing changed: no write.
    assert_eq!(agent_round(&b, &api, "n2"), 0);

    // A second commit on n1 while someone else writes to the Node: the first PATCH is refused
    // (409), the agent reads again and patches.
    commit(&a, "ci", "maven", "two");
    api.faults(&json!({"PATCH /api/v1/nodes/n1": [409]}));
    assert_eq!(agent_round(&a, &api, "n1"), 1);
    assert!(api
        .requests()
        .iter()
        .any(|l| l == "PATCH /api/v1/nodes/n1 409"));
    assert_eq!(
        read_node(&api, "n1")["metadata"]["labels"]["cache.jobcachefs.io/ci.maven"],
        "2"
    );

    // The cluster view.
    let kc = api.kubeconfig.display().to_string();
    let env = [("KUBECONFIG", kc.as_str())];
    let view = a
        .run_env(&["cache", "where", "maven", "-n", "ci", "-o", "json"], &env)
        .ok()
        .json();
    let rows: Vec<(String, u64)> = view
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            assert_eq!(h["cache"], "ci/maven");
            (
                h["node"].as_str().unwrap().to_string(),
                h["generation"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows[0], ("n1".to_string(), 2), "newest first: {view}");
    assert_eq!(rows[1].0, "n2");
    let all = a
        .run_env(&["cache", "where", "-o", "json"], &env)
        .ok()
        .json();
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    let table = a
        .run_env(&["cache", "where", "maven", "-n", "ci"], &env)
        .ok();
    assert!(table.stdout.contains("NODE") && table.stdout.contains("n1"));
    let missing = a.run_env(&["cache", "where", "npm", "-n", "ci"], &env);
    assert_eq!(missing.code, 4, "{}", missing.stderr);

    // `cache rm`: the label goes at the next round, the other stays.
    a.run(&["cache", "rm", "maven", "--namespace", "ci", "-y"])
        .ok();
    assert_eq!(agent_round(&a, &api, "n1"), 1);
    assert_eq!(
        cache_labels(&read_node(&api, "n1")),
        [(long_key(), "1".to_string())]
    );
    // Prune: the last cache goes, and so do the last label and the annotation.
    a.run(&["cache", "prune", "--max-total", "1Ki"]).ok();
    assert_eq!(agent_round(&a, &api, "n1"), 1);
    let n1 = read_node(&api, "n1");
    assert!(cache_labels(&n1).is_empty(), "{n1}");
    assert!(n1["metadata"]["annotations"]["jobcachefs.io/caches"].is_null());
    assert_eq!(n1["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
    // A node name the API does not know: the agent says so and goes on syncing.
    let unknown = agent_once(&a, &api, "n9");
    assert_eq!(unknown.code, 0);
    assert!(
        unknown.stderr.contains("Node n9 does not exist"),
        "{}",
        unknown.stderr
    );
    a.assert_clean();
    b.assert_clean();
}

/// A running `jobcachefs webhook`.
struct Webhook {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Webhook {
    fn start(dir: &Path, kubeconfig: &Path) -> Webhook {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let log = dir.join("webhook.log");
        let child = Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
            .args(["webhook", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .env("KUBECONFIG", kubeconfig)
            .env("JOBCACHEFS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start jobcachefs webhook");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the webhook did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Webhook { child, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA `name` and a serving certificate for 127.0.0.1 and the Service signed by it, as
/// tls.crt/tls.key.
fn make_certs(dir: &Path, name: &str) {
    make_ca(dir, name, name);
    let san = format!("IP:127.0.0.1,DNS:{SERVICE_HOST}");
    sign_server_cert(dir, name, "new", SERVICE_HOST, &san);
    // Renamed into place, as the kubelet updates a mounted Secret.
    std::fs::rename(dir.join("new.key"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("new.crt"), dir.join("tls.crt")).unwrap();
}

/// An HTTPS client that trusts only `ca`.
fn client(ca: &Path) -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &std::fs::read(ca).unwrap()[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // The Service's name, as the API server dials it, resolved to the webhook on 127.0.0.1.
    ureq::AgentBuilder::new()
        .resolver(|addr: &str| {
            let port = addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
            Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
        })
        .tls_config(Arc::new(tls))
        .timeout(Duration::from_secs(10))
        .build()
}

fn review(uid: &str, pod: &Value) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "ci", "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:ci:runner"},
        "object": pod, "dryRun": false
    }})
}

fn pod(volumes: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "build-", "namespace": "ci"},
        "spec": {"containers": [{"name": "b", "image": "busybox"}], "volumes": volumes}})
}

fn inline(cache: &str) -> Value {
    json!({"name": format!("c-{cache}"), "csi": {"driver": "csi.jobcachefs.io", "volumeAttributes": {"cache": cache}}})
}

/// Posts `body`; the review's response and the Pod the patch makes of `pod`.
fn admit(agent: &ureq::Agent, port: u16, body: &[u8], pod: &Value) -> (Value, Value) {
    let resp = agent
        .post(&format!("https://{SERVICE_HOST}:{port}/mutate"))
        .set("Content-Type", "application/json")
        .send_bytes(body)
        .unwrap();
    let answer: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    let r = answer["response"].clone();
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(r["allowed"], true, "{answer}");
    let mut out = pod.clone();
    if let Some(p) = r["patch"].as_str() {
        assert_eq!(r["patchType"], "JSONPatch");
        let ops: json_patch::Patch =
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p).unwrap())
                .unwrap();
        json_patch::patch(&mut out, &ops).unwrap();
    }
    (r, out)
}

fn preferred(pod: &Value) -> Vec<(String, u64)> {
    pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .map(|terms| {
            terms
                .iter()
                .map(|t| {
                    let e = &t["preference"]["matchExpressions"][0];
                    assert_eq!(e["operator"], "Exists");
                    (
                        e["key"].as_str().unwrap().to_string(),
                        t["weight"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn real_placement_webhook_over_tls_places_every_pod_shape() {
    let api = Api::start();
    api.storage_classes_from_deploy();
    api.put(
        &common::api::sc_path("standard"),
        &json!({"kind": "StorageClass", "apiVersion": "storage.k8s.io/v1",
            "metadata": {"name": "standard"}, "provisioner": "rancher.io/local-path"}),
    );
    api.pvc(
        "ci",
        "m2",
        "jobcache",
        &[("jobcachefs.io/cache", "maven")],
        "1Gi",
    );
    api.pvc(
        "ci",
        "plain",
        "standard",
        &[("jobcachefs.io/cache", "maven")],
        "1Gi",
    );
    put_node(
        &api,
        "n1",
        json!({"cache.jobcachefs.io/ci.maven": "3", "cache.jobcachefs.io/ci.npm": "1"}),
    );
    let dir = tempfile::Builder::new()
        .prefix("jcfs-webhook-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    // The certificate deploy/webhook/make-certs makes for the Service.
    let made =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/webhook/make-certs"))
            .arg("--out")
            .arg(d)
            .output()
            .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let hook = Webhook::start(d, &api.kubeconfig);
    let agent = client(&d.join("ca.crt"));
    let port = hook.port;
    let maven = "cache.jobcachefs.io/ci.maven".to_string();
    let npm = "cache.jobcachefs.io/ci.npm".to_string();
    let send = |uid: &str, p: &Value| admit(&agent, port, review(uid, p).to_string().as_bytes(), p);

    // Inline CSI: a preferred term of weight 100 per cache, and the annotation that says so.
    let p = pod(json!([inline("maven"), inline("npm")]));
    let (r, out) = send("u-inline", &p);
    assert_eq!(r["uid"], "u-inline");
    assert_eq!(preferred(&out), [(maven.clone(), 100), (npm.clone(), 100)]);
    assert_eq!(
        out["metadata"]["annotations"]["jobcachefs.io/placed"],
        "preferred maven,npm"
    );
    assert_eq!(out["spec"]["containers"], p["spec"]["containers"]);

    // A generic ephemeral volume of a jobcachefs class (the class read from the API).
    let p = pod(json!([{"name": "e", "ephemeral": {"volumeClaimTemplate": {
        "metadata": {"annotations": {"jobcachefs.io/cache": "npm"}},
        "spec": {"storageClassName": "jobcache-writeback", "accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "1Gi"}}}}}}]));
    let (_, out) = send("u-ephemeral", &p);
    assert_eq!(preferred(&out), [(npm.clone(), 100)]);

    // A PVC of a jobcachefs class (PVC and class read from the API); one of another class and
    // a PVC that does not exist yet place nothing.
    let p = pod(json!([{"name": "m", "persistentVolumeClaim": {"claimName": "m2"}}]));
    assert_eq!(preferred(&send("u-pvc", &p).1), [(maven.clone(), 100)]);
    for claim in ["plain", "not-yet"] {
        let p = pod(json!([{"name": "m", "persistentVolumeClaim": {"claimName": claim}}]));
        let (r, out) = send("u-other", &p);
        assert!(r["patch"].is_null(), "{claim}: {r}");
        assert_eq!(out, p);
    }

    // No cache; a Pod that places itself; an opt-out: untouched.
    let p = pod(json!([{"name": "d", "emptyDir": {}}]));
    assert!(send("u-none", &p).0["patch"].is_null());
    let mut p = pod(json!([inline("maven")]));
    p["spec"]["nodeSelector"] = json!({"pool": "big"});
    assert!(send("u-own", &p).0["patch"].is_null());
    let mut p = pod(json!([inline("maven")]));
    p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}]}}});
    assert!(send("u-own2", &p).0["patch"].is_null());
    let mut p = pod(json!([inline("maven")]));
    p["metadata"]["annotations"] = json!({"jobcachefs.io/placement": "off"});
    assert!(send("u-off", &p).0["patch"].is_null());

    // Pod anti-affinity of its own stays beside the node affinity.
    let mut p = pod(json!([inline("maven")]));
    let anti = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "b"}}, "topologyKey": "kubernetes.io/hostname"}]});
    p["spec"]["affinity"] = json!({"podAntiAffinity": anti});
    p["metadata"]["annotations"] = json!({"team": "a"});
    let (_, out) = send("u-anti", &p);
    assert_eq!(out["spec"]["affinity"]["podAntiAffinity"], anti);
    assert_eq!(preferred(&out), [(maven.clone(), 100)]);
    assert_eq!(out["metadata"]["annotations"]["team"], "a");

    // Required on request, where a node is warm; preferred with a warning where none is.
    let mut p = pod(json!([inline("maven")]));
    p["metadata"]["annotations"] = json!({"jobcachefs.io/placement": "required"});
    let (_, out) = send("u-req", &p);
    let terms = &out["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    assert_eq!(terms[0]["matchExpressions"][0]["key"], maven.as_str());
    let mut p = pod(json!([inline("gradle")]));
    p["metadata"]["annotations"] = json!({"jobcachefs.io/placement": "required"});
    let (r, out) = send("u-req-cold", &p);
    assert!(
        r["warnings"][0].as_str().unwrap().contains("ci/gradle"),
        "{r}"
    );
    assert_eq!(preferred(&out).len(), 1);

    // Malformed reviews: allowed, no patch, a log line.
    for body in [
        &b"{\"request\": 5"[..],
        br#"{"request": {"uid": "u-x", "kind": {"kind": "Secret"}}}"#,
    ] {
        let (r, _) = admit(&agent, port, body, &Value::Null);
        assert!(r["patch"].is_null());
    }
    assert!(
        hook.log().contains("review not understood"),
        "{}",
        hook.log()
    );

    // 1,000 reviews over kept-alive connections: every answer right; the latency printed
    // (bench figures, not asserted).
    let shapes = [
        pod(json!([inline("maven")])),
        pod(json!([{"name": "m", "persistentVolumeClaim": {"claimName": "m2"}}])),
        pod(json!([{"name": "d", "emptyDir": {}}])),
    ];
    let mut ms: [Vec<f64>; 3] = Default::default();
    for i in 0..1000 {
        let p = &shapes[i % 3];
        let body = review(&format!("u-{i}"), p).to_string();
        let t = Instant::now();
        let (r, out) = admit(&agent, port, body.as_bytes(), p);
        ms[i % 3].push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r["uid"], format!("u-{i}"));
        assert_eq!(preferred(&out).len(), usize::from(i % 3 != 2));
    }
    let mut all: Vec<f64> = ms.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let line = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!("p50 {:.2} ms, max {:.2} ms", v[v.len() / 2], v[v.len() - 1])
    };
    println!(
        "webhook: 1000 reviews over TLS, kept-alive: all {}; inline CSI {}; PVC (read from the API stand-in) {}; no cache {}",
        line(&mut all),
        line(&mut ms[0]),
        line(&mut ms[1]),
        line(&mut ms[2])
    );

    // A renewed certificate (another CA) is served without a restart.
    make_certs(d, "ca2");
    let renewed = client(&d.join("ca2.crt"));
    let t = Instant::now();
    loop {
        let got = renewed
            .get(&format!("https://{SERVICE_HOST}:{port}/healthz"))
            .call();
        if got.is_ok() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the renewed certificate was not served: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(client(&d.join("ca.crt"))
        .get(&format!("https://{SERVICE_HOST}:{port}/healthz"))
        .call()
        .is_err());
}
