//! Reliability as root, for real: disk admission on a small state filesystem, deletes on a full
//! disk, an upper that failed under its job, refused input that leaves no trace, a seeded SIGKILL
//! campaign and 64 live volumes.
//!
//! `JOBCACHEFS_CHAOS_KILLS` (default 100) and `JOBCACHEFS_CHAOS_SEED` tune the campaign.

mod common;

use common::{root_or_skip, sh, Node, Rng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Puts the node's state dir on a fresh ext4 filesystem of `mib` MiB (loop-mounted; the
/// node's guard unmounts it).
fn small_state(node: &Node, mib: u64) {
    let img = node.tmp.path().join("statefs.img");
    std::fs::create_dir_all(node.state()).unwrap();
    sh(&format!(
        "truncate -s {mib}M {i}; mkfs.ext4 -q -F {i}; mount -o loop,nosuid,nodev {i} {s}",
        i = img.display(),
        s = node.state().display()
    ));
}

/// Everything the state dir, the mount table and the loop devices show (what "no trace" means).
fn footprint(node: &Node) -> (BTreeSet<PathBuf>, Vec<PathBuf>, Vec<String>) {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            out.insert(e.path().strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &e.path(), out);
            }
        }
    }
    let mut files = BTreeSet::new();
    walk(&node.state(), &node.state(), &mut files);
    files.remove(Path::new("stats.json"));
    files.remove(Path::new("stats.lock"));
    (files, node.mounts(), node.loops())
}

#[test]
fn real_overcommit_is_refused_up_front_and_a_full_disk_still_lets_deletes_finish() {
    if !root_or_skip(
        "real_overcommit_is_refused_up_front_and_a_full_disk_still_lets_deletes_finish",
    ) {
        return;
    }
    let node = Node::new();
    small_state(&node, 1229); // 1.2 GiB
    let a = node.create("a", "c", &["--size", "512Mi", "--write-back"]);
    let before = footprint(&node);
    let b = node.vol("b");
    let r = node.run(&[
        "volume",
        "create",
        b.to_str().unwrap(),
        "--cache",
        "c",
        "--size",
        "900Mi",
    ]);
    assert_eq!(r.code, 3, "refused as over quota: {}", r.stderr);
    assert!(
        r.stderr.contains("volume of 900.0 MiB refused"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("raise `overcommit`"), "{}", r.stderr);
    assert_eq!(footprint(&node), before, "the refusal changed nothing");
    assert!(!b.exists());

    // The admitted volume fills up to its size: ENOSPC inside, never an I/O error.
    let out = std::process::Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", a.join("fill").display()),
            "bs=1M",
            "count=600",
            "conv=fsync",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("Input/output error"), "{err}");

    let digest = |f: &Path| {
        let out = std::process::Command::new("sha256sum")
            .arg(f)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let written = digest(&a.join("fill"));
    // The fsync put the volume's metadata in its journal; `sync` writes it to its home blocks
    // too (ext4 would within 30 s). Without it the write-back below would fail on the full
    // disk, and the delete would rightly refuse to commit a filesystem with write errors
    // (real_an_upper_that_failed_under_its_job_is_not_committed).
    sh("sync");

    // Now fill the host filesystem itself (space used outside jobcachefs), then delete.
    let filler = node.state().join("filler-outside-jobcachefs");
    let _ = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", filler.display()),
            "bs=1M",
            "conv=fsync",
        ])
        .output()
        .unwrap();
    // ext4 keeps a few MiB back that root's small writes still get: use those up too.
    let smalls = node.state().join("smalls-outside-jobcachefs");
    sh(&format!(
        "mkdir {d}; i=0; while head -c 4096 /dev/zero > {d}/f$i 2>/dev/null; do i=$((i+1)); done; sync",
        d = smalls.display()
    ));
    let d = node.delete(&a, &["-o", "json"]).ok().json();
    assert_eq!(d["outcome"], "committed", "{d}");
    assert!(
        !node.state().join("ballast").exists(),
        "the delete needed the ballast's room on the full disk"
    );
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_dir_all(&smalls).unwrap();
    let c = node.create("c2", "c", &["--size", "64Mi"]);
    let filled = std::fs::metadata(c.join("fill")).unwrap().len() >> 20;
    assert!(
        filled > 400,
        "the filled 512Mi volume was committed whole: {filled} MiB"
    );
    assert_eq!(
        digest(&c.join("fill")),
        written,
        "the committed bytes are the ones the job wrote"
    );
    node.delete(&c, &[]).ok();
    let doctor = node.run(&["doctor"]);
    assert!(
        doctor.stdout.contains("disk admission"),
        "{}",
        doctor.stdout
    );
}

#[test]
fn real_an_upper_that_failed_under_its_job_is_not_committed() {
    if !root_or_skip("real_an_upper_that_failed_under_its_job_is_not_committed") {
        return;
    }
    let node = Node::new();
    let v = node.create("v", "c", &["--write-back"]);
    std::fs::write(v.join("first"), "written before the failure").unwrap();
    // What ext4 does on a write error (errors=remount-ro): the upper turns read-only under the
    // job, whose later writes are refused.
    let uppers = node.state().join("mnt").join("uppers");
    let upper = std::fs::read_dir(&uppers)
        .unwrap()
        .next()
        .expect("the volume's upper mount")
        .unwrap()
        .path();
    sh(&format!("sync; mount -o remount,ro {}", upper.display()));
    assert!(std::fs::write(v.join("second"), "refused").is_err());
    let d = node.delete(&v, &["-o", "json"]).ok().json();
    assert_eq!(d["outcome"], "discarded", "{d}");
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("write errors while the job ran") && reason.contains("not committed"),
        "{d}"
    );
    assert_eq!(
        node.show("c")["generation"],
        0,
        "nothing was published: {}",
        node.show("c")
    );
    let c = node.create("c2", "c", &[]);
    assert!(!c.join("first").exists(), "the failed job's half stays out");
    node.delete(&c, &[]).ok();
    node.assert_clean();
}

#[test]
fn real_refused_input_leaves_state_mounts_and_loop_devices_as_they_were() {
    if !root_or_skip("real_refused_input_leaves_state_mounts_and_loop_devices_as_they_were") {
        return;
    }
    let node = Node::new();
    let v = node.create("v", "c", &["--write-back"]);
    std::fs::write(v.join("f"), "x").unwrap();
    node.delete(&v, &[]).ok();
    let file = node.vol("a-file");
    std::fs::write(&file, "x").unwrap();
    let full = node.vol("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("f"), "x").unwrap();
    let before = footprint(&node);
    let cases: Vec<Vec<&str>> = vec![
        vec!["volume", "create", file.to_str().unwrap(), "--cache", "c"],
        vec!["volume", "create", full.to_str().unwrap(), "--cache", "c"],
        vec!["cache", "squash", "nope"],
        vec!["cache", "rollback", "nope", "--to", "1"],
        vec!["cache", "rollback", "c", "--to", "9"],
        vec!["cache", "history", "nope"],
        vec!["volume", "create", "/tmp/jcfs-never", "--cache", "Bad_Name"],
        vec![
            "volume",
            "create",
            "/tmp/jcfs-never",
            "--cache",
            "d",
            "--size",
            "1Ki",
        ],
        vec![
            "volume",
            "create",
            "/tmp/jcfs-never",
            "--cache",
            "d",
            "--cache-size",
            "1Mi",
        ],
        vec![
            "volume",
            "create",
            "/tmp/jcfs-never",
            "--cache",
            "c",
            "--cache-mode",
            "clone",
        ],
        vec![
            "volume",
            "create",
            "/tmp/jcfs-never",
            "--cache",
            "d",
            "--cache-mode",
            "blob",
        ],
        vec![
            "volume",
            "create",
            "/tmp/jcfs-never",
            "--cache",
            "d",
            "--size",
            "1000Ti",
        ],
    ];
    for args in cases {
        let r = node.run(&args);
        assert_ne!(r.code, 0, "{args:?} must be refused");
        assert!(!r.stderr.is_empty(), "{args:?} says why");
        assert_eq!(footprint(&node), before, "{args:?} left a trace");
    }
    assert!(!Path::new("/tmp/jcfs-never").exists());
}

const STEPS: &[&str] = &[
    "create:recorded",
    "create:image-made",
    "create:upper-mounted",
    "create:mounted",
    "loop:attached",
    "delete:marked",
    "delete:overlay-unmounted",
    "delete:upper-unmounted",
    "commit:renamed",
    "publish:history-written",
    "commit:published",
    "delete:committed",
    "squash:view-mounted",
    "squash:copied",
    "squash:renamed",
    "squash:published",
    "rollback:published",
];

#[test]
fn real_chaos_sigkill_campaign_loses_no_commit_and_leaks_nothing() {
    if !root_or_skip("real_chaos_sigkill_campaign_loses_no_commit_and_leaks_nothing") {
        return;
    }
    let kills: usize = std::env::var("JOBCACHEFS_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("JOBCACHEFS_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    eprintln!("chaos: {kills} kills, seed {seed} (JOBCACHEFS_CHAOS_SEED replays it)");
    let node = Node::with_config("max_depth = 3\nsquash_inline = false\n");
    let mut rng = Rng(seed | 1);
    let caches = ["c0", "c1", "c2"];
    // What each cache must hold: files whose delete succeeded as a commit. Discarded files must
    // never appear.
    let mut committed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut discarded: BTreeSet<String> = BTreeSet::new();
    let mut killed = 0;
    let mut serial = 0;
    // Runs `args` with a crash at a random step; a killed run is retried without it, as the
    // provisioner retries a helper pod, until it succeeds.
    let run = |args: &[&str], rng: &mut Rng, killed: &mut usize| -> common::Run {
        let step = *rng.pick(STEPS);
        let r = node.run_env(args, &[("JOBCACHEFS_CRASH_AT", step)]);
        if r.code != -9 && r.code != 137 {
            return r;
        }
        *killed += 1;
        loop {
            let r = node.run(args);
            if r.code == 0 {
                return r;
            }
            assert!(
                r.code == 5 || r.stderr.contains("busy"),
                "a retry after a kill at {step} failed: {} {}",
                r.code,
                r.stderr
            );
        }
    };
    while killed < kills {
        serial += 1;
        let cache = *rng.pick(&caches);
        match rng.next() % 10 {
            0 => {
                run(&["cache", "squash", cache], &mut rng, &mut killed);
            }
            1 => {
                run(&["gc", "--drain"], &mut rng, &mut killed);
            }
            _ => {
                let dir = node.vol(&format!("v{serial}"));
                let d = dir.to_str().unwrap().to_string();
                let r = run(
                    &[
                        "volume",
                        "create",
                        &d,
                        "--cache",
                        cache,
                        "--size",
                        "32Mi",
                        "--write-back",
                    ],
                    &mut rng,
                    &mut killed,
                );
                assert_eq!(r.code, 0, "create: {}", r.stderr);
                let file = format!("f{serial}");
                std::fs::write(dir.join(&file), &file).unwrap();
                let discard = rng.next().is_multiple_of(4);
                let mut args = vec!["volume", "delete", d.as_str(), "-o", "json"];
                if discard {
                    args.push("--discard");
                }
                let r = run(&args, &mut rng, &mut killed);
                assert_eq!(r.code, 0, "delete: {}", r.stderr);
                let outcome = r.json()["outcome"].as_str().unwrap_or("").to_string();
                match (discard, outcome.as_str()) {
                    (true, "discarded") => {
                        discarded.insert(file);
                    }
                    (false, "committed") => {
                        committed.entry(cache).or_default().insert(file);
                    }
                    // A retried delete after a kill past the commit reports what it finds.
                    (false, "not-found") => {
                        committed.entry(cache).or_default().insert(file);
                    }
                    other => panic!("unexpected delete outcome {other:?}"),
                }
            }
        }
    }
    node.run(&["gc", "--drain"]).ok();
    for cache in caches {
        let dir = node.vol(&format!("check-{cache}"));
        let d = dir.to_str().unwrap();
        if node.run(&["cache", "show", cache]).code != 0 {
            assert!(committed.get(cache).is_none_or(|f| f.is_empty()));
            continue;
        }
        node.run(&["volume", "create", d, "--cache", cache]).ok();
        let present: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for f in committed.get(cache).into_iter().flatten() {
            assert!(
                present.contains(f),
                "commit {f} of {cache} lost (seed {seed})"
            );
        }
        for f in &discarded {
            assert!(
                !present.contains(f),
                "discarded {f} reached {cache} (seed {seed})"
            );
        }
        node.delete(&dir, &[]).ok();
    }
    assert!(node
        .run(&["volume", "ls", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    node.run(&["gc"]).ok();
    node.assert_clean();
    // No orphan layer: every image on disk is in a generation gc must keep.
    for cache in caches {
        let cdir = node.state().join("caches/default").join(cache);
        let Ok(entries) = std::fs::read_dir(cdir.join("layers")) else {
            continue;
        };
        let mut known = BTreeSet::new();
        for e in std::fs::read_dir(cdir.join("history"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let g: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            for l in g["layers"].as_array().unwrap() {
                known.insert(format!("{}.img", l["id"].as_str().unwrap()));
            }
        }
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(known.contains(&name), "orphan layer {name} in {cache}");
        }
    }
    eprintln!(
        "chaos: {killed} kills over {serial} operations, {} commits checked",
        committed.values().map(|s| s.len()).sum::<usize>()
    );
}

#[test]
fn real_64_live_volumes_over_8_caches_keep_every_commit() {
    if !root_or_skip("real_64_live_volumes_over_8_caches_keep_every_commit") {
        return;
    }
    let node = Node::new();
    let created = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..8 {
            let (node, created) = (&node, &created);
            s.spawn(move || {
                for i in 0..8 {
                    let cache = format!("c{}", (t + i) % 8);
                    let name = format!("t{t}-v{i}");
                    let started = std::time::Instant::now();
                    let dir = node.create(&name, &cache, &["--size", "32Mi", "--write-back"]);
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    std::fs::write(dir.join(&name), &name).unwrap();
                    created.lock().unwrap().push((cache, name, dir, ms));
                }
            });
        }
    });
    let created = created.into_inner().unwrap();
    assert_eq!(
        node.run(&["volume", "ls", "-o", "json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        64
    );
    let mut ms: Vec<f64> = created.iter().map(|c| c.3).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "64 creates at once (8 threads): p50 {:.1} ms, max {:.1} ms",
        ms[32], ms[63]
    );
    std::thread::scope(|s| {
        for chunk in created.chunks(8) {
            let node = &node;
            s.spawn(move || {
                for (_, _, dir, _) in chunk {
                    assert_eq!(
                        node.delete(dir, &["-o", "json"]).ok().json()["outcome"],
                        "committed"
                    );
                }
            });
        }
    });
    for c in 0..8 {
        let cache = format!("c{c}");
        let dir = node.create(&format!("check{c}"), &cache, &[]);
        for (cc, name, _, _) in &created {
            if *cc == cache {
                assert_eq!(
                    std::fs::read_to_string(dir.join(name)).unwrap(),
                    *name,
                    "{cache}"
                );
            }
        }
        node.delete(&dir, &[]).ok();
    }
    node.assert_clean();
}
