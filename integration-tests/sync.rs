//! Registry sync between two nodes (two state dirs) through a real registry: Debian's
//! docker-registry, started on 127.0.0.1 on a free port with its own storage, stopped after; real
//! skopeo; real loop devices, ext4 and overlayfs. The registry's access log is the witness of
//! what was uploaded and downloaded.

mod common;

use common::registry::Registry;
use common::{assert_same_tree, rich_tree, root_or_skip, sh, snap, Node, Run};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn uploads(log: &str, digest: &str) -> usize {
    let hex = digest.trim_start_matches("sha256:");
    log.lines()
        .filter(|l| l.contains("\"PUT ") && l.contains("/blobs/uploads/") && l.contains(hex))
        .count()
}

fn downloads(log: &str, digest: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"GET ") && l.contains(&format!("/blobs/{digest}")))
        .count()
}

fn export(n: &Node, cache: &str) -> serde_json::Value {
    n.run(&["cache", "export", cache, "-o", "json"]).ok().json()
}

fn import(n: &Node, cache: &str) -> serde_json::Value {
    n.run(&["cache", "import", cache, "-o", "json"]).ok().json()
}

/// Writes `files` into a new write-back volume of `cache` and commits it.
fn commit(n: &Node, vol: &str, cache: &str, script: &str) {
    let v = n.create(vol, cache, &["--size", "64Mi", "--write-back"]);
    sh(&format!("cd {}; {script}", v.display()));
    let r = n.delete(&v, &[]).ok();
    assert!(r.stdout.contains("committed"), "{}", r.stdout);
}

/// The files of a fresh read-only volume of `cache`, as sorted relative paths.
fn files(n: &Node, vol: &str, cache: &str) -> Vec<String> {
    let v = n.create(vol, cache, &[]);
    let mut out: Vec<String> = snap(&v)
        .into_iter()
        .filter(|(_, e)| e.kind == 'f')
        .map(|(p, _)| p.display().to_string())
        .collect();
    out.sort();
    n.delete(&v, &[]).ok();
    out
}

#[test]
fn real_sync_round_trip_keeps_every_kind_of_metadata() {
    if !root_or_skip("real_sync_round_trip_keeps_every_kind_of_metadata") {
        return;
    }
    // Blobs streamed over HTTP by jobcachefs (the default), and through skopeo: the same tree.
    for transport in ["", "direct_blobs = false\n"] {
        round_trip_keeps_every_kind_of_metadata(transport);
    }
}

fn round_trip_keeps_every_kind_of_metadata(transport: &str) {
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(transport));
    let b = Node::with_config(&reg.config(transport));
    // Two layers: a rich tree, then deletions (whiteouts), a replaced dir (opaque), metadata changes.
    let v1 = a.create("v1", "rich", &["--size", "256Mi", "--write-back"]);
    rich_tree(&v1, false);
    sh(&format!(
        "cd {}; mkdir -p old/sub; echo o > old/sub/o; echo g > gone",
        v1.display()
    ));
    a.delete(&v1, &[]).ok();
    let v2 = a.create("v2", "rich", &["--size", "256Mi", "--write-back"]);
    sh(&format!(
        "cd {d}; rm gone; rm -r old; mkdir old; echo new > old/new; chmod 640 a/file; \
         chown 42:43 a/b/c/random; echo more >> a/b/c/random; mkdir -p n/deep; ln a/file n/deep/link2",
        d = v2.display()
    ));
    let expected = snap(&v2);
    a.delete(&v2, &[]).ok();

    let mark = reg.log().len();
    let r = export(&a, "rich");
    assert_eq!(r["outcome"], "pushed");
    assert_eq!(r["layers"], 2);
    // Which client moved the blobs: the registry's access log names it.
    let direct = transport.is_empty();
    let log = reg.log_since(mark);
    let by_us = log
        .lines()
        .filter(|l| l.contains("/blobs/") && l.contains("jobcachefs/"))
        .count();
    assert_eq!(by_us > 0, direct, "transport {transport:?}:\n{log}");
    let r = import(&b, "rich");
    assert_eq!(r["outcome"], "imported");
    assert_eq!(r["new_layers"], 2);
    let vb = b.create("vb", "rich", &[]);
    // The same tree, to the nanosecond (PAX mtimes), with hardlinks, xattrs and sparse extents.
    assert_same_tree(&expected, &vb, "after import on another node");
    assert!(!vb.join("gone").exists() && !vb.join("old/sub").exists());
    b.delete(&vb, &[]).ok();
    // Nothing to do the second time, in either direction.
    assert_eq!(export(&a, "rich")["outcome"], "up-to-date");
    assert_eq!(import(&b, "rich")["outcome"], "up-to-date");
    a.assert_clean();
    b.assert_clean();
}

#[test]
fn real_sync_a_layer_bigger_than_its_blob_suggests_is_built_from_a_scan() {
    if !root_or_skip("real_sync_a_layer_bigger_than_its_blob_suggests_is_built_from_a_scan") {
        return;
    }
    // 320 MiB of text compresses to well under 1 MiB: more than the image that an import sizes
    // from the blob while it downloads (4x + 256 MiB) can hold. The import must notice the full
    // image, fetch the blob and build the layer sized from a scan, with the same tree.
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));
    let v = a.create("v", "text", &["--size", "512Mi", "--write-back"]);
    sh(&format!(
        "cd {}; yes 'all work and no play' | head -c 335544320 > log.txt; echo end > end",
        v.display()
    ));
    let expected = snap(&v);
    a.delete(&v, &[]).ok();
    let r = export(&a, "text");
    assert_eq!(r["outcome"], "pushed");
    assert!(r["new_bytes"].as_u64().unwrap() < 1 << 20, "{r}");
    let r = b
        .run_env(
            &["cache", "import", "text", "-o", "json"],
            &[("JOBCACHEFS_LOG", "info")],
        )
        .ok();
    assert!(
        r.stderr
            .contains("did not fit the image sized from its blob"),
        "the streamed build did not run out of room as meant: {}",
        r.stderr
    );
    assert_eq!(r.json()["outcome"], "imported");
    let vb = b.create("vb", "text", &[]);
    assert_same_tree(&expected, &vb, "after a scan-sized import");
    b.delete(&vb, &[]).ok();
    a.assert_clean();
    b.assert_clean();
}

#[test]
fn real_sync_delta_moves_only_the_new_layer() {
    if !root_or_skip("real_sync_delta_moves_only_the_new_layer") {
        return;
    }
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));
    commit(&a, "v1", "npm", "head -c 2000000 /dev/urandom > base.bin");
    export(&a, "npm");
    import(&b, "npm");
    let image = reg.image("default", "npm");
    let base = reg.layers(&image)[0].clone();

    commit(&a, "v2", "npm", "head -c 100000 /dev/urandom > delta.bin");
    let mark = reg.log().len();
    let r = export(&a, "npm");
    assert_eq!(
        (r["layers"].as_u64(), r["new_layers"].as_u64()),
        (Some(2), Some(1))
    );
    let layers = reg.layers(&image);
    assert_eq!(layers[0], base);
    let log = reg.log_since(mark);
    assert_eq!(
        uploads(&log, &base),
        0,
        "the base layer was uploaded again:\n{log}"
    );
    assert_eq!(
        uploads(&log, &layers[1]),
        1,
        "the new layer was not uploaded:\n{log}"
    );

    let mark = reg.log().len();
    let r = import(&b, "npm");
    assert_eq!(r["new_layers"], 1);
    let log = reg.log_since(mark);
    assert_eq!(
        downloads(&log, &base),
        0,
        "the base layer was downloaded again:\n{log}"
    );
    assert_eq!(downloads(&log, &layers[1]), 1, "{log}");
    assert_eq!(files(&b, "check", "npm"), ["base.bin", "delta.bin"]);
    a.assert_clean();
    b.assert_clean();
}

/// The progress lines of a transfer in a command's JSON log: (percent, bytes done, message).
fn progress_lines(stderr: &str, what: &str) -> Vec<(u64, u64, String)> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let f = &v["fields"];
            let msg = f["message"].as_str()?;
            let rest = msg.strip_prefix(what)?;
            let pct = rest.split('(').nth(1)?.split('%').next()?.parse().ok()?;
            Some((pct, f["done"].as_u64()?, msg.to_string()))
        })
        .collect()
}

#[test]
fn real_sync_long_transfers_log_their_progress() {
    if !root_or_skip("real_sync_long_transfers_log_their_progress") {
        return;
    }
    // 96 MiB that does not compress: both ways well past the size from which a transfer logs
    // each tenth (64 MiB), whatever the machine's speed. Not on a terminal (the tests' stderr
    // is a file), so the log says it, not a bar.
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));
    let v = a.create("v", "big", &["--size", "256Mi", "--write-back"]);
    sh(&format!(
        "cd {}; head -c 100663296 /dev/urandom > blob",
        v.display()
    ));
    a.delete(&v, &[]).ok();
    let check = |r: &Run, what: &str| {
        let lines = progress_lines(&r.stderr, what);
        let text = lines
            .iter()
            .map(|l| l.2.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        // Each tenth at least once, in order, the bytes growing with it.
        for tenth in 1..=10 {
            assert!(
                lines.iter().any(|l| l.0 / 10 == tenth),
                "{what}: no line at {}0%:\n{text}\n{}",
                tenth,
                r.stderr
            );
        }
        assert!(
            lines
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1),
            "{what}: not in order:\n{text}"
        );
        assert!(
            lines.len() <= 10 + 2 * 60,
            "{what}: {} lines, more than a tenth each and one per 5 s:\n{text}",
            lines.len()
        );
        // Past the first half second a line tells the rate and the time left.
        assert!(
            lines
                .iter()
                .any(|l| l.2.contains("MiB/s") && l.2.contains(" left")),
            "{what}: no line with a rate and a time left:\n{text}"
        );
        // The last line is the end: all of it, about the files' bytes (tar headers on export,
        // the compressed stream on import).
        let (pct, done, _) = lines.last().unwrap();
        assert_eq!(*pct, 100, "{what}:\n{text}");
        assert!(
            (96 << 20..=100 << 20).contains(done),
            "{what}: {done} bytes counted for 96 MiB of files:\n{text}"
        );
    };
    let r = a.run(&["cache", "export", "big", "-o", "json"]).ok();
    assert_eq!(r.json()["outcome"], "pushed");
    check(&r, "export default/big: ");
    let r = b.run(&["cache", "import", "big", "-o", "json"]).ok();
    assert_eq!(r.json()["outcome"], "imported");
    check(&r, "import default/big: ");
    // Nothing moved, nothing logged.
    let r = b.run(&["cache", "import", "big", "-o", "json"]).ok();
    assert_eq!(r.json()["outcome"], "up-to-date");
    assert_eq!(progress_lines(&r.stderr, "import default/big: ").len(), 0);
    a.assert_clean();
    b.assert_clean();
}

#[test]
fn real_sync_converges_in_both_orders_and_after_a_race() {
    if !root_or_skip("real_sync_converges_in_both_orders_and_after_a_race") {
        return;
    }
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));
    commit(&a, "s", "gradle", "echo seed > seed");
    export(&a, "gradle");
    import(&b, "gradle");

    // A first, then B: B's push is stacked on A's line.
    commit(&a, "a1", "gradle", "echo a > from-a1");
    commit(&b, "b1", "gradle", "echo b > from-b1");
    assert_eq!(export(&a, "gradle")["rebased"], false);
    assert_eq!(export(&b, "gradle")["rebased"], true);
    import(&a, "gradle");
    import(&b, "gradle");
    let want = ["from-a1", "from-b1", "seed"];
    assert_eq!(files(&a, "c1", "gradle"), want);
    assert_eq!(files(&b, "c2", "gradle"), want);

    // B first, then A; the same file written on both: the later push wins, as on one node.
    commit(&b, "b2", "gradle", "echo b > from-b2; echo b > both");
    commit(&a, "a2", "gradle", "echo a > from-a2; echo a > both");
    export(&b, "gradle");
    export(&a, "gradle");
    import(&a, "gradle");
    import(&b, "gradle");
    let want = ["both", "from-a1", "from-a2", "from-b1", "from-b2", "seed"];
    assert_eq!(files(&a, "c3", "gradle"), want);
    assert_eq!(files(&b, "c4", "gradle"), want);
    let v = b.create("c5", "gradle", &[]);
    assert_eq!(std::fs::read_to_string(v.join("both")).unwrap(), "a\n");
    b.delete(&v, &[]).ok();

    // A race: B's push is held after it read the line; A pushes meanwhile; B must notice,
    // re-base on A's line and push again — neither commit is lost.
    commit(&a, "a3", "gradle", "echo a > from-a3");
    commit(&b, "b3", "gradle", "echo b > from-b3");
    let gate = b.tmp.path().join("gate");
    std::fs::write(&gate, "").unwrap();
    let mut held = b.command();
    held.args(["cache", "export", "gradle", "-o", "json"])
        .env("JOBCACHEFS_PAUSE_AT", "sync:before-push")
        .env("JOBCACHEFS_PAUSE_FILE", &gate)
        .stdout(Stdio::piped());
    let child = held.spawn().unwrap();
    let reached = b.tmp.path().join("gate.reached");
    let t = Instant::now();
    while !reached.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "B never reached the push"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(export(&a, "gradle")["outcome"], "pushed");
    std::fs::remove_file(&gate).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["attempts"], 2, "B did not notice it lost the race: {r}");
    assert_eq!(r["rebased"], true);
    import(&a, "gradle");
    import(&b, "gradle");
    let want = [
        "both", "from-a1", "from-a2", "from-a3", "from-b1", "from-b2", "from-b3", "seed",
    ];
    assert_eq!(files(&a, "c6", "gradle"), want);
    assert_eq!(files(&b, "c7", "gradle"), want);
    a.assert_clean();
    b.assert_clean();
}

#[test]
fn real_sync_squashed_line_is_pushed_as_a_new_base() {
    if !root_or_skip("real_sync_squashed_line_is_pushed_as_a_new_base") {
        return;
    }
    let reg = Registry::start();
    let config = format!("max_depth = 3\nsquash_inline = false\n{}", reg.config(""));
    let a = Node::with_config(&config);
    let b = Node::with_config(&config);
    for i in 0..4 {
        commit(&a, &format!("v{i}"), "cargo", &format!("echo {i} > f{i}"));
        export(&a, "cargo");
    }
    let image = reg.image("default", "cargo");
    assert_eq!(reg.layers(&image).len(), 4);
    a.run(&["cache", "squash", "cargo"]).ok();
    let r = export(&a, "cargo");
    assert_eq!(
        (r["outcome"].as_str(), r["layers"].as_u64()),
        (Some("pushed"), Some(1))
    );
    assert_eq!(
        reg.layers(&image).len(),
        1,
        "the remote line must be squashed too"
    );
    // B, which never saw the deltas, gets the base; A, which has the same base, gets nothing.
    assert_eq!(import(&b, "cargo")["new_layers"], 1);
    assert_eq!(import(&a, "cargo")["outcome"], "up-to-date");
    assert_eq!(files(&b, "c", "cargo"), ["f0", "f1", "f2", "f3"]);
    a.assert_clean();
    b.assert_clean();
}

/// Every file under `dir` (lock files aside) with the SHA-256 of its content.
fn fingerprint(dir: &Path) -> Vec<(String, String)> {
    use sha2::Digest;
    let mut out = Vec::new();
    for (rel, e) in snap(dir) {
        if e.kind == 'f' && rel.file_name().is_some_and(|n| n != "lock") {
            let bytes = std::fs::read(dir.join(&rel)).unwrap();
            out.push((
                rel.display().to_string(),
                format!("{:x}", sha2::Sha256::digest(&bytes)),
            ));
        } else if e.kind != 'f' {
            out.push((rel.display().to_string(), e.kind.to_string()));
        }
    }
    out
}

#[test]
fn real_sync_pull_on_create_warms_a_cold_cache() {
    if !root_or_skip("real_sync_pull_on_create_warms_a_cold_cache") {
        return;
    }
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let c = Node::with_config(&reg.config("pull_on_create = true\n"));
    commit(&a, "v", "go", "echo mod > go.mod");
    export(&a, "go");
    // No import on C: its first volume of the cache pulls it before mounting.
    let v = c.create("v", "go", &[]);
    assert_eq!(std::fs::read_to_string(v.join("go.mod")).unwrap(), "mod\n");
    c.delete(&v, &[]).ok();
    c.assert_clean();
}

#[test]
fn real_sync_crashed_import_is_repaired_by_gc() {
    if !root_or_skip("real_sync_crashed_import_is_repaired_by_gc") {
        return;
    }
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));
    commit(&a, "v", "pip", "echo wheel > wheel");
    export(&a, "pip");
    // Killed with a half-built layer mounted, then with layers built but not published: gc
    // leaves nothing mounted or attached, and the cache is at its old generation.
    for step in ["sync:layer-mounted", "sync:layers-built"] {
        let r = b.run_env(
            &["cache", "import", "pip"],
            &[("JOBCACHEFS_CRASH_AT", step)],
        );
        assert_eq!(r.code, 137, "{step}: {}", r.stderr);
        b.run(&["gc"]).ok();
        b.assert_clean();
        assert_eq!(b.generation("pip"), 0, "{step}");
    }
    // Killed right after the publish: the new generation is whole.
    let r = b.run_env(
        &["cache", "import", "pip"],
        &[("JOBCACHEFS_CRASH_AT", "sync:imported")],
    );
    assert_eq!(r.code, 137);
    b.run(&["gc"]).ok();
    assert_eq!(b.generation("pip"), 1);
    assert_eq!(files(&b, "c", "pip"), ["wheel"]);
    assert_eq!(import(&b, "pip")["outcome"], "up-to-date");
    b.assert_clean();
}

fn craft_and_push(reg: &Registry, kind: &str) -> String {
    let out = tempfile::tempdir().unwrap();
    let st = Command::new("python3")
        .arg(Path::new(REPO).join("integration-tests/sync/craft_image.py"))
        .arg(kind)
        .arg(out.path())
        .status()
        .unwrap();
    assert!(st.success());
    let image = reg.image("default", &format!("evil-{kind}"));
    let st = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", out.path().display()))
        .arg(format!("docker://{image}:latest"))
        .status()
        .unwrap();
    assert!(st.success());
    image
}

#[test]
fn real_sync_refuses_hostile_images_and_changes_nothing() {
    if !root_or_skip("real_sync_refuses_hostile_images_and_changes_nothing") {
        return;
    }
    let reg = Registry::start();
    let b = Node::with_config(&reg.config(""));
    commit(&b, "v", "victim", "echo mine > mine");
    for (kind, needle) in [
        ("dotdot", "escapes the layer's root"),
        ("abs-symlink", "points outside the cache"),
        ("rel-symlink-escape", "points outside the cache"),
        ("hardlink-escape", "escapes the layer's root"),
        ("device", "is a device node"),
        ("huge-claim", "claim more than the cache-size"),
    ] {
        let image = craft_and_push(&reg, kind);
        let state_before = fingerprint(&b.state().join("caches"));
        let r: Run = b.run(&[
            "cache",
            "import",
            "victim",
            "--image",
            &image,
            "--tls-verify=false",
        ]);
        assert_ne!(r.code, 0, "{kind} was accepted");
        assert!(
            r.stderr.contains("refusing the image"),
            "{kind}: {}",
            r.stderr
        );
        assert!(r.stderr.contains(needle), "{kind}: {}", r.stderr);
        // Nothing changed: same generation, same files, no half-built layer, nothing mounted.
        assert_eq!(
            state_before,
            fingerprint(&b.state().join("caches")),
            "{kind} changed the caches"
        );
        let tmp = b.state().join("sync/tmp");
        assert_eq!(
            std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0),
            0,
            "half-built layers left"
        );
        assert_eq!(b.generation("victim"), 1);
        b.assert_clean();
    }
    // A new cache is not even created by a refused import.
    let image = craft_and_push(&reg, "dotdot");
    let r = b.run(&[
        "cache",
        "import",
        "fresh",
        "--image",
        &image,
        "--tls-verify=false",
    ]);
    assert_eq!(r.code, 2);
    assert_eq!(b.run(&["cache", "show", "fresh"]).code, 4);
    assert_eq!(files(&b, "check", "victim"), ["mine"]);
}

#[test]
fn real_sync_registry_down_fails_fast_and_volumes_do_not_care() {
    if !root_or_skip("real_sync_registry_down_fails_fast_and_volumes_do_not_care") {
        return;
    }
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let n = Node::with_config(&format!(
        "[[registry]]\nimage = \"127.0.0.1:{closed}/caches\"\ntls_verify = false\ntimeout = \"20s\"\npull_on_create = true\n"
    ));
    // volume create with pull_on_create on a cold cache: the pull fails, the volume is made.
    let t = Instant::now();
    commit(&n, "v", "m2", "echo x > x");
    assert!(t.elapsed() < Duration::from_secs(30));
    for args in [["cache", "export", "m2"], ["cache", "import", "m2"]] {
        let t = Instant::now();
        let r = n.run(&args);
        assert_eq!(r.code, 7, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("check that the registry is reachable"),
            "{}",
            r.stderr
        );
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(n.generation("m2"), 1);
    // The agent keeps going and backs off instead of hammering the registry.
    let r = n.run(&[
        "agent",
        "--rounds",
        "2",
        "--interval",
        "1s",
        "--metrics-addr",
        "off",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("sync failed; backing off").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("retry_in_s"), "{}", r.stderr);
    n.assert_clean();
}

#[test]
fn real_sync_auth_failure_is_clear() {
    if !root_or_skip("real_sync_auth_failure_is_clear") {
        return;
    }
    // A registry that demands a token from a realm that gives none.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:{port}, secret: s}}\nauth:\n  silly:\n    realm: http://127.0.0.1:{port}/token\n    service: test\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = Node::with_config(&format!(
        "[[registry]]\nimage = \"127.0.0.1:{port}/caches\"\ntls_verify = false\ntimeout = \"20s\"\n"
    ));
    commit(&n, "v", "auth", "echo x > x");
    for args in [["cache", "export", "auth"], ["cache", "import", "auth"]] {
        let t = Instant::now();
        let r = n.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("check auth.json"), "{}", r.stderr);
        assert!(t.elapsed() < Duration::from_secs(25));
    }
    assert_eq!(n.generation("auth"), 1);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    n.assert_clean();
}

/// Prometheus text parsed by the reference parser (prometheus_client, in .venv).
fn parse_metrics(text: &str) -> serde_json::Value {
    let py = Path::new(REPO).join(".venv/bin/python");
    assert!(
        py.exists(),
        "run scripts/setup (it installs prometheus-client in .venv)"
    );
    let mut c = Command::new(py)
        .arg("-c")
        .arg(
            "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
             out = {}\nfor f in p(sys.stdin.read()):\n    for s in f.samples:\n        \
             key = s.name + ('{' + ','.join(f'{k}={v}' for k, v in sorted(s.labels.items())) + '}' if s.labels else '')\n        \
             out[key] = s.value\nprint(json.dumps(out))",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "the metrics do not parse:\n{text}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn real_sync_agents_carry_a_commit_to_the_other_node() {
    if !root_or_skip("real_sync_agents_carry_a_commit_to_the_other_node") {
        return;
    }
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));
    let (pa, pb) = (free_port(), free_port());
    for (n, port) in [(&a, pa), (&b, pb)] {
        let cfg = std::fs::read_to_string(n.config.as_ref().unwrap()).unwrap();
        std::fs::write(
            n.config.as_ref().unwrap(),
            format!("{cfg}\n[agent]\ninterval = \"1s\"\nmetrics_addr = \"127.0.0.1:{port}\"\nprefetch = [\"default/shared\"]\n"),
        )
        .unwrap();
    }
    let spawn = |n: &Node| {
        Agent(
            n.command()
                .arg("agent")
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _aa = spawn(&a);
    let _ab = spawn(&b);
    // A commit on A, and nothing else by hand: B's next volume must have it.
    commit(&a, "v", "shared", "echo from-a > from-a");
    let t = Instant::now();
    loop {
        if b.generation("shared") >= 1 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the commit did not reach B"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(files(&b, "vb", "shared"), ["from-a"]);

    let ma = parse_metrics(&http_get(pa, "/metrics"));
    let mb = parse_metrics(&http_get(pb, "/metrics"));
    assert_eq!(ma["jobcachefs_commits_total"], 1.0);
    assert_eq!(ma["jobcachefs_pushes_total"], 1.0);
    assert!(ma["jobcachefs_push_bytes_total"].as_f64().unwrap() > 0.0);
    assert_eq!(ma["jobcachefs_volumes_created_total{cache=cold}"], 1.0);
    assert_eq!(mb["jobcachefs_pulls_total"], 1.0);
    assert!(mb["jobcachefs_pull_bytes_total"].as_f64().unwrap() > 0.0);
    assert_eq!(mb["jobcachefs_volumes_created_total{cache=warm}"], 1.0);
    assert_eq!(
        mb["jobcachefs_cache_generation{name=shared,namespace=default}"],
        1.0
    );
    assert!(mb["jobcachefs_agent_rounds_total"].as_f64().unwrap() >= 1.0);
    assert_eq!(http_get(pa, "/nope").trim(), "try /metrics");
    drop(_aa);
    drop(_ab);
    a.assert_clean();
    b.assert_clean();
}

/// Root buildah with storage of its own (`CONTAINERS_STORAGE_CONF`: graphroot and runroot under
/// a temp dir), so that nothing but buildah's blob-info cache lands in /var/lib/containers. Drop
/// removes its containers and images and unmounts whatever is left under the temp dir.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Buildah {
        let dir = tempfile::Builder::new()
            .prefix("jcfs-buildah-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/graph\"\nrunroot = \"{d}/run\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        Buildah { dir }
    }

    /// Runs buildah; returns its trimmed stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("buildah")
            .args(args)
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .output()
            .expect("run buildah (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "buildah {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `buildah from IMAGE` and `buildah mount`: the image's tree as the kernel's overlay shows it.
    fn mount(&self, image: &str) -> std::path::PathBuf {
        let c = self.run(&["from", "--quiet", "--tls-verify=false", image]);
        self.run(&["mount", &c]).into()
    }

    /// Pushes `image` with uncompressed layers. The docker transport always compresses, so
    /// the layers go through a `dir:` copy (which keeps them plain) pushed as they are.
    fn push_plain(&self, image: &str, format: &str, dst: &str) {
        let dir = self.dir.path().join(format!("plain-{format}"));
        let _ = std::fs::remove_dir_all(&dir);
        let format = if format == "docker" { "v2s2" } else { "oci" };
        let conf = self.dir.path().join("storage.conf");
        for args in [
            vec![
                "copy".to_string(),
                "--quiet".into(),
                "--format".into(),
                format.into(),
                format!("containers-storage:localhost/{image}"),
                format!("dir:{}", dir.display()),
            ],
            vec![
                "copy".to_string(),
                "--quiet".into(),
                "--preserve-digests".into(),
                "--dest-tls-verify=false".into(),
                format!("dir:{}", dir.display()),
                dst.to_string(),
            ],
        ] {
            let out = Command::new("skopeo")
                .args(&args)
                .env("CONTAINERS_STORAGE_CONF", &conf)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "skopeo {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs `script` in the mounted root of a new container from `from`, commits it as `name`
    /// in `format`.
    fn layer(&self, from: &str, script: &str, name: &str, formats: &[&str]) {
        let c = self.run(&["from", "--quiet", from]);
        let m = self.run(&["mount", &c]);
        sh(&format!("cd {m}; {script}"));
        for f in formats {
            self.run(&[
                "commit",
                "--quiet",
                "--format",
                f,
                &c,
                &format!("{name}-{f}"),
            ]);
        }
        self.run(&["rm", &c]);
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let conf = self.dir.path().join("storage.conf");
        for args in [&["rm", "--all"][..], &["rmi", "--all", "--force"]] {
            let _ = Command::new("buildah")
                .args(args)
                .env("CONTAINERS_STORAGE_CONF", &conf)
                .output();
        }
        let mut mounts = common::leaked_mounts(self.dir.path());
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in &mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The GOARCH spelling of this machine (what an image index names).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A snapshot without data extents: buildah writes a file's zeros as data, jobcachefs as holes.
fn without_extents(mut s: jobcachefs::files::tree::Snapshot) -> jobcachefs::files::tree::Snapshot {
    for e in s.values_mut() {
        e.extents.clear();
    }
    s
}

#[test]
fn real_sync_imports_images_that_buildah_built() {
    if !root_or_skip("real_sync_imports_images_that_buildah_built") {
        return;
    }
    let reg = Registry::start();
    let bh = Buildah::new();
    let n = Node::with_config(&reg.config(""));
    // Every layer media type a registry serves: OCI and Docker manifests; gzip (buildah's
    // default), zstd, uncompressed; (name, commit format, push flags, the layers' media type).
    let variants: [(&str, &str, &[&str], &str); 5] = [
        (
            "oci-gzip",
            "oci",
            &[],
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            "docker-gzip",
            "docker",
            &[],
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        (
            "oci-zstd",
            "oci",
            &["--compression-format", "zstd"],
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            "oci-tar",
            "oci",
            &["--disable-compression"],
            "application/vnd.oci.image.layer.v1.tar",
        ),
        (
            "docker-tar",
            "docker",
            &["--disable-compression"],
            "application/vnd.docker.image.rootfs.diff.tar",
        ),
    ];
    for (name, format, flags, layer_type) in variants {
        // Three layers from scratch: a tree; then a deleted file (whiteout) and a directory
        // removed and made again (opaque); then a changed file and new metadata. Each variant
        // builds its own (a marker file makes its layers unique): buildah 1.28 reuses a blob
        // the registry already has in another compression, whatever the push flags say.
        bh.layer(
            "scratch",
            &format!(
                "mkdir -p keep/sub olddir/x; echo a > keep/a; echo gone > keep/gone; \
                 echo o > olddir/x/o; echo y > olddir/y; ln keep/a keep/hard; \
                 ln -s ../keep/a olddir/link; chown 7:8 keep/sub; chmod 2750 keep/sub; \
                 setfattr -n user.origin -v seed keep/a; touch -d '2021-02-03 04:05:06' keep/a; \
                 echo {name} > variant1"
            ),
            &format!("{name}-l1"),
            &[format],
        );
        bh.layer(
            &format!("{name}-l1-{format}"),
            &format!(
                "rm keep/gone; rm -r olddir; mkdir olddir; echo new > olddir/new; echo b > keep/b; \
                 echo {name} > variant2"
            ),
            &format!("{name}-l2"),
            &[format],
        );
        bh.layer(
            &format!("{name}-l2-{format}"),
            "echo more >> keep/b; mkdir -p deep/er; head -c 100000 /dev/urandom > deep/er/bin; \
             chmod 600 deep/er/bin",
            &format!("{name}-img"),
            &[format],
        );
        let local = format!("{name}-img-{format}");
        let image = format!("{}:v1", reg.image("seeds", name));
        let dst = format!("docker://{image}");
        if name.ends_with("-tar") {
            bh.push_plain(&local, format, &dst);
        } else {
            let mut args = vec!["push", "--quiet", "--tls-verify=false"];
            args.extend_from_slice(flags);
            args.extend_from_slice(&[&local, &dst]);
            bh.run(&args);
        }
        let want = if format == "docker" {
            "application/vnd.docker.distribution.manifest.v2+json"
        } else {
            "application/vnd.oci.image.manifest.v1+json"
        };
        let raw = sh_out(&format!(
            "skopeo inspect --raw --tls-verify=false docker://{image}"
        ));
        assert!(raw.contains(want), "{name}: {raw}");
        assert_eq!(
            raw.matches(&format!("\"{layer_type}\"")).count(),
            3,
            "{name}: {raw}"
        );
        // The oracle: the image as buildah mounts it (the kernel's overlay of its layers).
        let oracle = snap(&bh.mount(&dst));
        assert!(oracle.contains_key(Path::new("olddir/new")));
        assert!(!oracle.contains_key(Path::new("keep/gone")));
        assert!(!oracle.contains_key(Path::new("olddir/x")));

        let cache = format!("seed-{name}");
        let r = n
            .run(&[
                "cache",
                "import",
                &cache,
                "--image",
                &image,
                "--tls-verify=false",
                "-o",
                "json",
            ])
            .ok()
            .json();
        assert_eq!(
            (r["outcome"].as_str(), r["new_layers"].as_u64()),
            (Some("imported"), Some(3)),
            "{name}: {r}"
        );
        let v = n.create(&format!("v-{name}"), &cache, &[]);
        assert_same_tree(&oracle, &v, &format!("{name}: imported vs buildah mount"));
        n.delete(&v, &[]).ok();
        // The same image again: nothing to do.
        let r = n
            .run(&[
                "cache",
                "import",
                &cache,
                "--image",
                &image,
                "--tls-verify=false",
                "-o",
                "json",
            ])
            .ok()
            .json();
        assert_eq!(r["outcome"], "up-to-date", "{name}: {r}");
    }

    // A seeded cache travels like any other: its export pushes the image's own blobs (gzip,
    // under their media type), and another node gets the same tree.
    let oracle = snap(&bh.mount("docker-gzip-img-docker"));
    let r = export(&n, "seed-docker-gzip");
    assert_eq!(
        (r["outcome"].as_str(), r["layers"].as_u64()),
        (Some("pushed"), Some(3)),
        "{r}"
    );
    let raw = sh_out(&format!(
        "skopeo inspect --raw --tls-verify=false docker://{}:latest",
        reg.image("default", "seed-docker-gzip")
    ));
    assert_eq!(
        raw.matches("application/vnd.oci.image.layer.v1.tar+gzip")
            .count(),
        3,
        "{raw}"
    );
    let b = Node::with_config(&reg.config(""));
    assert_eq!(import(&b, "seed-docker-gzip")["new_layers"], 3);
    let v = b.create("v-b", "seed-docker-gzip", &[]);
    assert_same_tree(&oracle, &v, "seeded, exported, imported on another node");
    b.delete(&v, &[]).ok();
    b.assert_clean();

    // An image index: the node's platform is picked; with none, the refusal names what is there.
    let oracle = snap(&bh.mount("oci-gzip-img-oci"));
    let ok = format!("{}:v1", reg.image("seeds", "index"));
    bh.run(&["manifest", "create", "list-ok"]);
    bh.run(&[
        "manifest",
        "add",
        "--arch",
        go_arch(),
        "--os",
        "linux",
        "list-ok",
        "oci-gzip-img-oci",
    ]);
    bh.run(&[
        "manifest",
        "add",
        "--arch",
        "s390x",
        "--os",
        "linux",
        "list-ok",
        "docker-gzip-img-docker",
    ]);
    bh.run(&[
        "manifest",
        "push",
        "--quiet",
        "--all",
        "--tls-verify=false",
        "list-ok",
        &format!("docker://{ok}"),
    ]);
    n.run(&[
        "cache",
        "import",
        "seed-index",
        "--image",
        &ok,
        "--tls-verify=false",
    ])
    .ok();
    let v = n.create("v-index", "seed-index", &[]);
    assert_same_tree(&oracle, &v, "index: imported vs buildah mount");
    n.delete(&v, &[]).ok();

    let other = if go_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let bad = format!("{}:v1", reg.image("seeds", "index-other"));
    bh.run(&["manifest", "create", "list-other"]);
    bh.run(&[
        "manifest",
        "add",
        "--arch",
        other,
        "--os",
        "linux",
        "list-other",
        "oci-gzip-img-oci",
    ]);
    bh.run(&[
        "manifest",
        "push",
        "--quiet",
        "--all",
        "--tls-verify=false",
        "list-other",
        &format!("docker://{bad}"),
    ]);
    let r = n.run(&[
        "cache",
        "import",
        "seed-other",
        "--image",
        &bad,
        "--tls-verify=false",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let want = format!(
        "is a multi-platform image with no linux/{} image (it has: linux/{other})",
        go_arch()
    );
    assert!(r.stderr.contains(&want), "{}", r.stderr);
    assert_eq!(n.run(&["cache", "show", "seed-other"]).code, 4);
    n.assert_clean();
}

#[test]
fn real_sync_buildah_reads_an_exported_cache() {
    if !root_or_skip("real_sync_buildah_reads_an_exported_cache") {
        return;
    }
    let reg = Registry::start();
    let bh = Buildah::new();
    let a = Node::with_config(&reg.config(""));
    // Two layers: a rich tree, then a deletion (whiteout) and a replaced dir (opaque).
    let v1 = a.create("v1", "tree", &["--size", "256Mi", "--write-back"]);
    rich_tree(&v1, false);
    sh(&format!(
        "cd {}; mkdir -p old/sub; echo o > old/sub/o; echo g > gone",
        v1.display()
    ));
    a.delete(&v1, &[]).ok();
    commit(
        &a,
        "v2",
        "tree",
        "rm gone; rm -r old; mkdir old; echo new > old/new; echo more >> a/file",
    );
    assert_eq!(export(&a, "tree")["layers"], 2);

    let v = a.create("look", "tree", &[]);
    let volume = snap(&v);
    a.delete(&v, &[]).ok();
    let image = format!("docker://{}:latest", reg.image("default", "tree"));
    let mounted = snap(&bh.mount(&image));
    assert!(
        !mounted.contains_key(Path::new("gone")) && !mounted.contains_key(Path::new("old/sub"))
    );
    let d = jobcachefs::files::tree::diff(&without_extents(volume), &without_extents(mounted));
    assert!(
        d.is_empty(),
        "buildah mount differs from a volume:\n{}",
        d.join("\n")
    );
    a.assert_clean();
}

/// Runs a shell snippet; returns its stdout.
fn sh_out(script: &str) -> String {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "sh failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A clone cache: 0/0 devices, overlay xattrs, hardlinks, sparse files and ns mtimes survive
/// export → import on another node exactly; the second export uploads only a small delta, and
/// the other node, holding the older generation, downloads and applies only that delta.
#[test]
fn real_sync_clone_cache_round_trips_exactly_and_pushes_only_deltas() {
    if !root_or_skip("real_sync_clone_cache_round_trips_exactly_and_pushes_only_deltas") {
        return;
    }
    const CLONE: &[&str] = &[
        "--cache-mode",
        "clone",
        "--cache-size",
        "512Mi",
        "--write-back",
    ];
    let reg = Registry::start();
    // Pools of their own (the state dirs are on ext4); the tree has a device node and an
    // absolute symlink, which a clone cache holds as data.
    let config = format!(
        "clone_pool_size = \"4Gi\"\n{}",
        reg.config("allow_devices = true\n")
    );
    let a = Node::with_config(&config);
    let b = Node::with_config(&config);
    let v1 = a.create("v1", "images", CLONE);
    rich_tree(&v1, true);
    sh(&format!(
        "cd {}; mkdir -p l/diff/gone l/work; mknod l/diff/wh c 0 0; \
         setfattr -n trusted.overlay.opaque -v y l/diff/gone; \
         setfattr -n trusted.overlay.redirect -v /x l/work; \
         head -c 8000000 /dev/urandom > l/diff/blob; chown 1000:1000 .; chmod 751 .",
        v1.display()
    ));
    let expected = snap(&v1);
    let d = a.delete(&v1, &["-o", "json"]).ok().json();
    assert_eq!(d["outcome"], "committed", "{d}");

    let full = export(&a, "images");
    assert_eq!(
        (full["outcome"].as_str(), full["layers"].as_u64()),
        (Some("pushed"), Some(1)),
        "{full}"
    );
    let image = reg.image("default", "images");
    let base = reg.layers(&image)[0].clone();
    let r = import(&b, "images");
    assert_eq!(r["outcome"], "imported", "{r}");
    assert_eq!(b.show("images")["mode"], "clone");
    let check = |n: &Node, vol: &str, expected: &jobcachefs::files::tree::Snapshot, what: &str| {
        let v = n.create(vol, "images", &[]);
        assert_same_tree(expected, &v, what);
        for (p, name, value) in [
            ("l/diff/gone", "trusted.overlay.opaque", &b"y"[..]),
            ("l/work", "trusted.overlay.redirect", &b"/x"[..]),
        ] {
            assert_eq!(
                xattr::get(v.join(p), name).unwrap().as_deref(),
                Some(value),
                "{what}: {p} {name}"
            );
        }
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let md = std::fs::symlink_metadata(v.join("l/diff/wh")).unwrap();
        assert!(md.file_type().is_char_device() && md.rdev() == 0, "{what}");
        let root = std::fs::metadata(&v).unwrap();
        assert_eq!(
            (root.uid(), root.permissions().mode() & 0o7777),
            (1000, 0o751),
            "{what}: the root's owner and mode"
        );
        n.delete(&v, &[]).ok();
    };
    check(&b, "vb", &expected, "after a full import");

    // A small commit: only it travels.
    let v2 = a.create("v2", "images", CLONE);
    sh(&format!(
        "cd {}; echo small > l/new; rm -r a/b/c; mknod l/diff/wh2 c 0 0; \
         setfattr -x trusted.overlay.opaque l/diff/gone; touch -d '2022-02-02 02:02:02.5' a/file",
        v2.display()
    ));
    let expected2 = snap(&v2);
    a.delete(&v2, &[]).ok();
    let mark = reg.log().len();
    let delta = export(&a, "images");
    assert_eq!(
        (delta["layers"].as_u64(), delta["new_layers"].as_u64()),
        (Some(2), Some(1)),
        "{delta}"
    );
    let (full_bytes, delta_bytes) = (
        full["new_bytes"].as_u64().unwrap(),
        delta["new_bytes"].as_u64().unwrap(),
    );
    eprintln!("clone export: full {full_bytes} bytes, delta {delta_bytes} bytes");
    assert!(
        delta_bytes < 64 << 10 && full_bytes > 8_000_000,
        "full {full_bytes}, delta {delta_bytes}"
    );
    let layers = reg.layers(&image);
    assert_eq!(layers[0], base);
    let log = reg.log_since(mark);
    assert_eq!(uploads(&log, &base), 0, "the full layer again:\n{log}");
    assert_eq!(uploads(&log, &layers[1]), 1, "{log}");

    // B holds the older generation: it downloads only the delta and applies it to a clone.
    let mark = reg.log().len();
    let r = import(&b, "images");
    assert_eq!(
        (r["outcome"].as_str(), r["new_layers"].as_u64()),
        (Some("imported"), Some(1)),
        "{r}"
    );
    let log = reg.log_since(mark);
    assert_eq!(downloads(&log, &base), 0, "{log}");
    assert_eq!(downloads(&log, &layers[1]), 1, "{log}");
    check_delta(&b, &expected2);
    assert_eq!(export(&a, "images")["outcome"], "up-to-date");
    assert_eq!(import(&b, "images")["outcome"], "up-to-date");
    assert_eq!(export(&b, "images")["outcome"], "up-to-date");

    // A fresh node rebuilds from both layers.
    let c = Node::with_config(&config);
    assert_eq!(import(&c, "images")["new_layers"], 2);
    check_delta(&c, &expected2);
    // A new cache takes the line's mode; an overlay cache refuses it.
    let o = a.run(&["cache", "import", "other", "--image", &image]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(a.show("other")["mode"], "clone");
    let ov = a.create("ov", "ov", &[]);
    a.delete(&ov, &[]).ok();
    let o = a.run(&["cache", "import", "ov", "--image", &image]);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("holds a clone-mode image"),
        "{}",
        o.stderr
    );
    // The reflink pool stays mounted (node infrastructure); nothing of a volume or a sync does.
    for n in [&a, &b, &c] {
        n.assert_clean_volumes();
        let sync_mounts: Vec<_> = n
            .mounts()
            .into_iter()
            .filter(|m| m.starts_with(n.state().join("mnt/sync")))
            .collect();
        assert!(sync_mounts.is_empty(), "{sync_mounts:?}");
    }
}

/// The tree after the second commit of the clone test, and its overlay xattrs.
fn check_delta(n: &Node, expected: &jobcachefs::files::tree::Snapshot) {
    let v = n.create("check", "images", &[]);
    assert_same_tree(expected, &v, "after the delta");
    assert_eq!(
        xattr::get(v.join("l/diff/gone"), "trusted.overlay.opaque").unwrap(),
        None,
        "a removed overlay xattr is removed"
    );
    assert!(!v.join("a/b/c").exists());
    n.delete(&v, &[]).ok();
}

/// The raw manifest of `image:latest`, as the registry serves it.
fn raw_manifest(image: &str) -> serde_json::Value {
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
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The content of `file` in a fresh read-only volume of `cache`.
fn read(n: &Node, vol: &str, cache: &str, file: &str) -> String {
    let v = n.create(vol, cache, &[]);
    let s = std::fs::read_to_string(v.join(file)).unwrap_or_else(|e| format!("<{e}>"));
    n.delete(&v, &[]).ok();
    s.trim().to_string()
}

/// The node's current generation record of `default/<cache>`.
fn current(n: &Node, cache: &str) -> serde_json::Value {
    let p = n
        .state()
        .join("caches/default")
        .join(cache)
        .join("current.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

#[test]
fn real_sync_a_rollback_is_pushed_and_never_merged_back() {
    if !root_or_skip("real_sync_a_rollback_is_pushed_and_never_merged_back") {
        return;
    }
    let reg = Registry::start();
    let a = Node::with_config(&reg.config(""));
    let b = Node::with_config(&reg.config(""));
    let image = reg.image("default", "maven");
    commit(&a, "good", "maven", "echo good > dep.jar");
    let good_gen = a.generation("maven");
    commit(&a, "poison", "maven", "echo poison > dep.jar");
    assert_eq!(export(&a, "maven")["layers"], 2);
    let m = raw_manifest(&image);
    let good_digest = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let poison_digest = m["layers"][1]["digest"].as_str().unwrap().to_string();
    let poison_id = m["layers"][1]["annotations"]["io.jobcachefs.layer.id"]
        .as_str()
        .unwrap()
        .to_string();
    // Provenance travels with the image: the commit that made the exported generation.
    let ann = &m["annotations"];
    assert_eq!(ann["io.jobcachefs.provenance.kind"], "commit", "{m}");
    assert_eq!(
        ann["io.jobcachefs.provenance.source"],
        a.vol("poison").display().to_string()
    );
    assert!(
        ann["io.jobcachefs.provenance.detail.volume"].is_string(),
        "{m}"
    );
    assert!(ann["org.opencontainers.image.created"]
        .as_str()
        .is_some_and(|c| c.ends_with('Z') && c.len() == 20));
    assert!(ann.get("io.jobcachefs.undone").is_none(), "{m}");

    assert_eq!(import(&b, "maven")["outcome"], "imported");
    assert_eq!(read(&b, "r1", "maven", "dep.jar"), "poison");
    // Import keeps the provenance: what the other node's generation came from.
    let h = b
        .run(&["cache", "history", "maven", "-n", "1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(h[0]["kind"], "import", "{h}");
    assert_eq!(h[0]["details"]["origin.kind"], "commit", "{h}");
    assert_eq!(
        h[0]["details"]["origin.source"],
        a.vol("poison").display().to_string()
    );
    assert!(h[0]["details"]["digest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));

    // A rolls back and exports: the registry's line is the rolled-back one.
    a.run(&["cache", "rollback", "maven", "--to", &good_gen.to_string()])
        .ok();
    assert_eq!(read(&a, "r2", "maven", "dep.jar"), "good");
    let r = export(&a, "maven");
    assert_eq!(r["outcome"], "pushed", "{r}");
    assert_eq!(r["layers"], 1, "{r}");
    assert_eq!(reg.layers(&image), [good_digest]);
    let m = raw_manifest(&image);
    let ann = &m["annotations"];
    assert_eq!(ann["io.jobcachefs.undone"], poison_id.as_str(), "{m}");
    assert_eq!(ann["io.jobcachefs.provenance.kind"], "rollback", "{m}");
    assert_eq!(
        ann["io.jobcachefs.provenance.detail.to"],
        good_gen.to_string()
    );
    assert_eq!(export(&a, "maven")["outcome"], "up-to-date");

    // B had the poison: its import drops it and records the tombstone.
    let mark = reg.log().len();
    let r = import(&b, "maven");
    assert_eq!(r["outcome"], "imported", "{r}");
    assert_eq!(r["new_layers"], 0, "{r}");
    assert_eq!(downloads(&reg.log_since(mark), &poison_digest), 0);
    assert_eq!(read(&b, "r3", "maven", "dep.jar"), "good");
    let cur = current(&b, "maven");
    assert_eq!(cur["undone"], serde_json::json!([poison_id]), "{cur}");
    assert_eq!(cur["layers"].as_array().unwrap().len(), 1, "{cur}");
    // Neither node puts it back.
    assert_eq!(export(&b, "maven")["outcome"], "up-to-date");
    assert_eq!(import(&a, "maven")["outcome"], "up-to-date");
    assert_eq!(read(&a, "r4", "maven", "dep.jar"), "good");

    // A layer committed after the rollback travels as usual, both ways, without the poison.
    commit(&b, "after", "maven", "echo fixed > more.txt");
    assert_eq!(export(&b, "maven")["outcome"], "pushed");
    assert_eq!(reg.layers(&image).len(), 2);
    assert!(!reg.layers(&image).contains(&poison_digest));
    assert_eq!(import(&a, "maven")["outcome"], "imported");
    assert_eq!(read(&a, "r5", "maven", "dep.jar"), "good");
    assert_eq!(read(&a, "r6", "maven", "more.txt"), "fixed");
    assert_eq!(
        raw_manifest(&image)["annotations"]["io.jobcachefs.undone"],
        poison_id.as_str(),
        "the tombstone stays with the line"
    );
    a.assert_clean();
    b.assert_clean();
}
