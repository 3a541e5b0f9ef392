//! The operator's CLI end to end on real caches: ls/show JSON, resize up while a volume writes,
//! resize down that fits and one that does not, prune by age and budget (dry run = real run),
//! rm with a live volume, gc after an injected crash, doctor, completions and man page, and bad
//! input that changes nothing.

mod common;

use common::{root_or_skip, sh, Node};
use std::path::Path;

/// Makes a cache `name` holding `mib` MiB of incompressible data in one layer.
fn cache_with(n: &Node, name: &str, mib: u64, extra: &[&str]) {
    let v = n.create(
        &format!("seed-{name}"),
        name,
        &[&["--size", "256Mi", "--write-back"], extra].concat(),
    );
    sh(&format!(
        "head -c {} /dev/urandom > {}/data",
        mib << 20,
        v.display()
    ));
    n.delete(&v, &[]).ok();
}

/// Ages a cache's last use by `secs` seconds.
fn age(n: &Node, name: &str, secs: u64) {
    let p = n.state().join(format!("caches/default/{name}/last-used"));
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_modified(t).unwrap();
}

#[test]
fn real_listings_are_json_with_documented_fields() {
    if !root_or_skip("real_listings_are_json_with_documented_fields") {
        return;
    }
    let n = Node::new();
    cache_with(&n, "npm", 1, &["--cache-size", "1Gi"]);
    let v = n.create("live", "npm", &["--size", "64Mi", "--write-back"]);
    let ls = n.run(&["cache", "ls", "-o", "json"]).ok().json();
    let c = &ls[0];
    for field in [
        "namespace",
        "name",
        "generation",
        "depth",
        "layers",
        "allocated",
        "cache_size",
        "on_disk",
        "volumes",
        "last_used",
        "created",
        "squash_due",
    ] {
        assert!(c.get(field).is_some(), "cache ls lacks {field}: {c}");
    }
    assert_eq!(c["cache_size"], 1u64 << 30);
    assert_eq!(c["volumes"][0], v.to_str().unwrap());
    for field in ["id", "created", "source", "size", "allocated"] {
        assert!(c["layers"][0].get(field).is_some(), "layer lacks {field}");
    }
    let vols = n.run(&["volume", "ls", "-o", "json"]).ok().json();
    for field in [
        "id",
        "dir",
        "cache",
        "generation",
        "layers",
        "size",
        "write_back",
        "created",
        "state",
        "used",
        "mounted",
    ] {
        assert!(
            vols[0].get(field).is_some(),
            "volume ls lacks {field}: {}",
            vols[0]
        );
    }
    let one = n
        .run(&["volume", "show", v.to_str().unwrap(), "-o", "json"])
        .ok()
        .json();
    assert_eq!(one["dir"], v.to_str().unwrap());
    assert_eq!(one["mounted"], true);
    assert!(n.run(&["cache", "ls"]).ok().stdout.contains("npm"));
    assert!(n
        .run(&["cache", "show", "npm"])
        .ok()
        .stdout
        .contains("Live volumes: 1"));
    n.delete(&v, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_resize_up_while_writing_and_down() {
    if !root_or_skip("real_resize_up_while_writing_and_down") {
        return;
    }
    let n = Node::new();
    cache_with(&n, "grow", 20, &["--cache-size", "40Mi"]);
    // A live volume keeps writing while the limit grows.
    let v = n.create("writer", "grow", &["--size", "128Mi", "--write-back"]);
    let vd = v.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..20 {
            std::fs::write(vd.join(format!("w{i}")), vec![7u8; 1 << 20]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let r = n
        .run(&["cache", "resize", "grow", "200Mi", "-o", "json"])
        .ok()
        .json();
    assert_eq!(r["cache_size"], 200u64 << 20);
    writer.join().unwrap();
    assert_eq!(n.show("grow")["cache_size"], 200u64 << 20);
    sh(&format!(
        "head -c 30000000 /dev/urandom > {}/more",
        v.display()
    ));
    // 20 + 30 + 20 MB: over the old limit of 40 MiB, fine under the new one.
    let d = n.delete(&v, &["-o", "json"]).ok().json();
    assert_eq!(d["outcome"], "committed", "{d}");

    // Shrink that fits: rebuilt into one smaller base, data intact.
    let before = n.create("before", "grow", &[]);
    let expected = jobcachefs::files::tree::snapshot(&before).unwrap();
    n.delete(&before, &[]).ok();
    n.run(&["cache", "resize", "grow", "120Mi"]).ok();
    let s = n.show("grow");
    assert_eq!(s["cache_size"], 120u64 << 20);
    assert_eq!(s["depth"], 1);
    assert!(s["allocated"].as_u64().unwrap() <= 120 << 20);
    let after = n.create("after", "grow", &[]);
    assert!(jobcachefs::files::tree::diff(
        &expected,
        &jobcachefs::files::tree::snapshot(&after).unwrap()
    )
    .is_empty());
    n.delete(&after, &[]).ok();

    // Shrink that does not fit: a clear error, nothing changed.
    let s0 = n.show("grow");
    let r = n.run(&["cache", "resize", "grow", "32Mi"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot shrink") && r.stderr.contains("unchanged"),
        "{}",
        r.stderr
    );
    let s1 = n.show("grow");
    assert_eq!(s0["generation"], s1["generation"]);
    assert_eq!(s0["cache_size"], s1["cache_size"]);
    assert_eq!(
        std::fs::read_dir(n.state().join("caches/default/grow/tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    n.assert_clean();
}

#[test]
fn real_prune_by_age_and_budget_dry_run_matches() {
    if !root_or_skip("real_prune_by_age_and_budget_dry_run_matches") {
        return;
    }
    let n = Node::new();
    for (name, days) in [("old", 30), ("mid", 10), ("new", 1)] {
        cache_with(&n, name, 4, &[]);
        age(&n, name, days * 86_400);
    }
    cache_with(&n, "busy", 4, &[]);
    age(&n, "busy", 60 * 86_400);
    let live = n.create("live", "busy", &[]);

    let dry = n
        .run(&[
            "cache",
            "prune",
            "--unused-for",
            "14d",
            "--dry-run",
            "-o",
            "json",
        ])
        .ok()
        .json();
    let names: Vec<_> = dry
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["old"], "busy has a live volume and stays");
    assert!(dry[0]["frees"].as_u64().unwrap() >= 4 << 20);
    assert_eq!(
        n.run(&["cache", "ls", "-o", "json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        4,
        "dry run changed nothing"
    );
    let real = n
        .run(&["cache", "prune", "--unused-for", "14d", "-o", "json"])
        .ok()
        .json();
    // The same caches, bytes and last use; the reason's age in seconds may have ticked on
    // between the two runs (a CI run here crossed a second boundary).
    let without_age = |v: &serde_json::Value| {
        let mut v = v.clone();
        for c in v.as_array_mut().unwrap() {
            let reason = c["reason"].as_str().unwrap().to_string();
            assert!(reason.starts_with("unused for "), "{reason}");
            c.as_object_mut().unwrap().remove("reason");
        }
        v
    };
    assert_eq!(without_age(&dry), without_age(&real));
    assert!(!n.state().join("caches/default/old").exists());

    // Budget: least recently used first until the total fits.
    let total: u64 = n
        .run(&["cache", "ls", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["on_disk"].as_u64().unwrap())
        .sum();
    let budget = format!("{}", total - 1);
    let dry = n
        .run(&[
            "cache",
            "prune",
            "--max-total",
            &budget,
            "--dry-run",
            "-o",
            "json",
        ])
        .ok()
        .json();
    let names: Vec<_> = dry
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["mid"]);
    let real = n
        .run(&["cache", "prune", "--max-total", &budget, "-o", "json"])
        .ok()
        .json();
    assert_eq!(dry, real);
    let left: Vec<_> = n
        .run(&["cache", "ls", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec!["busy", "new"]);
    n.delete(&live, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_node_budget_prunes_after_commit() {
    if !root_or_skip("real_node_budget_prunes_after_commit") {
        return;
    }
    let n = Node::with_config("node_budget = \"24Mi\"\n");
    cache_with(&n, "first", 10, &[]);
    age(&n, "first", 3600);
    cache_with(&n, "second", 10, &[]);
    // The third commit pushes the node over 24 MiB: the least recently used cache goes.
    cache_with(&n, "third", 10, &[]);
    let left: Vec<_> = n
        .run(&["cache", "ls", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec!["second", "third"]);
    n.assert_clean();
}

#[test]
fn real_rm_with_a_live_volume() {
    if !root_or_skip("real_rm_with_a_live_volume") {
        return;
    }
    let n = Node::new();
    cache_with(&n, "gone", 8, &[]);
    let v = n.create("live", "gone", &["--write-back"]);
    let r = n.run(&["cache", "rm", "gone"]);
    assert_eq!(r.code, 2, "no terminal, no --yes: refused");
    assert!(r.stderr.contains("--yes"));
    n.run(&["cache", "rm", "gone", "--yes"]).ok();
    assert_eq!(
        n.run(&["cache", "show", "gone"]).code,
        4,
        "unpublished at once"
    );
    // The live volume keeps working: reads the old data, writes new.
    assert_eq!(std::fs::metadata(v.join("data")).unwrap().len(), 8 << 20);
    std::fs::write(v.join("new"), b"x").unwrap();
    let layers = n.state().join("caches/default/gone/layers");
    assert_eq!(
        std::fs::read_dir(&layers).unwrap().count(),
        1,
        "space is held while the volume lives"
    );
    // Its write-back is discarded (the cache is gone); the space is freed after its delete.
    let d = n.delete(&v, &["-o", "json"]).ok().json();
    assert_eq!(d["outcome"], "discarded");
    assert!(!n.state().join("caches/default/gone").exists());
    assert_eq!(
        n.run(&["cache", "ls", "-o", "json"]).ok().json(),
        serde_json::json!([])
    );
    n.assert_clean();
}

#[test]
fn real_gc_repairs_injected_crashes_while_volumes_live() {
    if !root_or_skip("real_gc_repairs_injected_crashes_while_volumes_live") {
        return;
    }
    let n = Node::new();
    cache_with(&n, "g", 1, &[]);
    let second = n.create("second", "g", &["--write-back"]);
    std::fs::write(second.join("second"), b"2").unwrap();
    n.delete(&second, &[]).ok();
    let live = n.create("live", "g", &["--write-back"]);
    std::fs::write(live.join("mine"), b"1").unwrap();
    let crashed = n.vol("crashed");
    let r = n.run_env(
        &[
            "volume",
            "create",
            crashed.to_str().unwrap(),
            "--cache",
            "g",
        ],
        &[("JOBCACHEFS_CRASH_AT", "create:upper-mounted")],
    );
    assert_eq!(r.code, 137);
    let r = n.run_env(
        &["cache", "squash", "g"],
        &[("JOBCACHEFS_CRASH_AT", "squash:copied")],
    );
    assert_eq!(r.code, 137);
    let doctor = n.run(&["doctor"]);
    assert!(
        doctor.stdout.contains("stuck in state Creating"),
        "{}",
        doctor.stdout
    );
    let report = n.run(&["gc", "-o", "json"]).ok().json();
    assert_eq!(report["rolled_back"][0], crashed.to_str().unwrap());
    assert!(
        !report["tmp_removed"].as_array().unwrap().is_empty(),
        "{report}"
    );
    // The live volume was not disturbed and still commits.
    assert_eq!(std::fs::read(live.join("mine")).unwrap(), b"1");
    n.delete(&live, &[]).ok();
    assert_eq!(n.generation("g"), 3);
    let doctor = n.run(&["doctor"]).ok();
    assert!(
        doctor.stdout.contains("0 failed, 0 warnings"),
        "{}",
        doctor.stdout
    );
    n.assert_clean();
}

#[test]
fn real_doctor_is_green_and_names_missing_tools() {
    if !root_or_skip("real_doctor_is_green_and_names_missing_tools") {
        return;
    }
    let n = Node::new();
    let r = n.run(&["doctor", "-o", "json"]).ok().json();
    for f in r.as_array().unwrap() {
        assert_eq!(f["status"], "ok", "{f}");
    }
    // A PATH without mkfs.ext4: the finding names the tool and its package.
    let bin = n.tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["e2fsck", "resize2fs"] {
        std::os::unix::fs::symlink(format!("/usr/sbin/{tool}"), bin.join(tool)).unwrap();
    }
    let r = n.run_env(&["doctor"], &[("PATH", bin.to_str().unwrap())]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("[FAIL] tool mkfs.ext4")
            && r.stdout.contains("apt-get install e2fsprogs"),
        "{}",
        r.stdout
    );
    // And the commands that need it say so too.
    let r = n.run_env(
        &["volume", "create", n.vol("v").to_str().unwrap()],
        &[("PATH", bin.to_str().unwrap())],
    );
    assert_eq!(r.code, 6);
    assert!(
        r.stderr.contains("mkfs.ext4") && r.stderr.contains("e2fsprogs"),
        "{}",
        r.stderr
    );
    n.assert_clean();
}

#[test]
fn completions_and_man_page() {
    let n = Node::new();
    let r = n.run(&["completions", "bash"]).ok();
    assert!(r.stdout.contains("jobcachefs") && r.stdout.contains("prune"));
    let r = n.run(&["man"]).ok();
    assert!(
        r.stdout.contains(".TH jobcachefs"),
        "{}",
        &r.stdout[..200.min(r.stdout.len())]
    );
}

#[test]
fn real_operator_bad_input_changes_nothing() {
    if !root_or_skip("real_operator_bad_input_changes_nothing") {
        return;
    }
    let n = Node::new();
    cache_with(&n, "keep", 1, &[]);
    let before = n.show("keep");
    for (args, code, needle) in [
        (vec!["cache", "show", "missing"], 4, "does not exist"),
        (
            vec!["cache", "resize", "missing", "1Gi"],
            4,
            "does not exist",
        ),
        (vec!["cache", "resize", "keep", "12Qi"], 2, "\"12Qi\""),
        (
            vec!["cache", "resize", "keep", "1Ki"],
            2,
            "below the minimum",
        ),
        (vec!["cache", "squash", "Bad_Name"], 2, "\"Bad_Name\""),
        (vec!["cache", "rm", "missing", "--yes"], 4, "does not exist"),
        (vec!["cache", "prune"], 2, "--unused-for"),
        (vec!["cache", "prune", "--unused-for", "14x"], 2, "\"14x\""),
        (vec!["cache", "prune", "--max-total", "lots"], 2, "\"lots\""),
        (
            vec!["volume", "create", "/tmp/x-never", "--cache-size", "1Gi"],
            2,
            "--cache-size needs --cache",
        ),
        (vec!["volume", "show", "/tmp/x-never"], 4, "no volume"),
    ] {
        let r = n.run(&args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(needle),
            "{args:?}: expected {needle:?} in {}",
            r.stderr
        );
    }
    let r = n.run_env(
        &["cache", "ls"],
        &[("JOBCACHEFS_CONFIG", "/nonexistent/config.toml")],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("/nonexistent/config.toml"));
    assert_eq!(n.show("keep"), before);
    assert!(!Path::new("/tmp/x-never").exists());
    n.assert_clean();
}

#[test]
fn real_history_names_the_poisoning_job_and_rollback_undoes_it() {
    if !root_or_skip("real_history_names_the_poisoning_job_and_rollback_undoes_it") {
        return;
    }
    let node = Node::new();
    let a = node.create("job-a", "maven", &["--write-back"]);
    std::fs::write(a.join("dep.jar"), "good").unwrap();
    node.delete(&a, &[]).ok();
    let b = node.create("job-b", "maven", &["--write-back"]);
    std::fs::write(b.join("dep.jar"), "poison").unwrap();
    node.delete(&b, &[]).ok();
    let h = node
        .run(&["cache", "history", "maven", "-o", "json"])
        .ok()
        .json();
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 2);
    for (entry, dir, generation) in [(&h[0], &b, 2), (&h[1], &a, 1)] {
        assert_eq!(entry["generation"], generation);
        assert_eq!(entry["kind"], "commit");
        assert_eq!(entry["source"], dir.to_str().unwrap());
        assert!(entry["created"].as_u64().unwrap() > 0);
    }
    let table = node.run(&["cache", "history", "maven"]).ok().stdout;
    assert!(
        table.contains("job-b") && table.contains("current"),
        "{table}"
    );
    let r = node.run(&["cache", "rollback", "maven", "--to", "1"]).ok();
    assert!(
        r.stdout.contains("published as generation 3"),
        "{}",
        r.stdout
    );
    let c = node.create("job-c", "maven", &[]);
    assert_eq!(std::fs::read_to_string(c.join("dep.jar")).unwrap(), "good");
    node.delete(&c, &[]).ok();
    let h = node
        .run(&["cache", "history", "maven", "-n", "1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(h[0]["kind"], "rollback");
    assert_eq!(h[0]["source"], "generation 1");
    let bad = node.run(&["cache", "rollback", "maven", "--to", "7"]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("has no generation 7"), "{}", bad.stderr);
    node.assert_clean();
}
