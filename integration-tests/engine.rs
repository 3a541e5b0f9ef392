//! The engine end to end, as root, on real loop devices, ext4 images and overlayfs: round trip,
//! fidelity against the kernel's merged view, concurrency, quotas, crashes, idempotency and bad
//! input. Every test runs in its own state dir and checks it leaked no mount or loop device.

mod common;

use common::{assert_same_tree, rich_tree, root_or_skip, sh, snap, Node};

#[test]
fn real_round_trip_and_discard() {
    if !root_or_skip("real_round_trip_and_discard") {
        return;
    }
    let n = Node::new();
    let v1 = n.create("v1", "maven", &["--size", "64Mi", "--write-back"]);
    sh(&format!(
        "cd {}; mkdir -p keep/sub gone replaced; echo a > keep/a; echo s > keep/sub/s; echo g > gone/g; \
         echo old > replaced/old; echo r > renamed-from",
        v1.display()
    ));
    assert!(n.delete(&v1, &[]).ok().stdout.contains("generation 1"));

    // Second volume: deletions, a directory replaced by a new one, a rename.
    let v2 = n.create("v2", "maven", &["--size", "64Mi", "--write-back"]);
    assert_eq!(std::fs::read_to_string(v2.join("keep/a")).unwrap(), "a\n");
    sh(&format!(
        "cd {}; rm -r gone; rm -r replaced; mkdir replaced; echo new > replaced/new; mv renamed-from renamed-to; \
         echo changed > keep/a",
        v2.display()
    ));
    let expected = snap(&v2);
    n.delete(&v2, &[]).ok();
    assert_eq!(n.generation("maven"), 2);

    let v3 = n.create("v3", "maven", &[]);
    assert_same_tree(&expected, &v3, "after commit");
    assert!(!v3.join("gone").exists());
    assert!(
        !v3.join("replaced/old").exists(),
        "an opaque dir must hide the old contents"
    );
    assert!(!v3.join("renamed-from").exists());
    assert_eq!(
        std::fs::read_to_string(v3.join("renamed-to")).unwrap(),
        "r\n"
    );
    // A volume without write-back changes nothing.
    sh(&format!(
        "cd {}; rm -r keep; echo junk > junk",
        v3.display()
    ));
    n.delete(&v3, &[]).ok();
    assert_eq!(n.generation("maven"), 2);

    // A write-back volume deleted with --discard changes nothing either.
    let v4 = n.create("v4", "maven", &["--write-back"]);
    sh(&format!("echo junk > {}/junk", v4.display()));
    assert!(n
        .delete(&v4, &["--discard"])
        .ok()
        .stdout
        .contains("discarded"));
    assert_eq!(n.generation("maven"), 2);

    // A write-back volume that changed nothing publishes nothing.
    let v5 = n.create("v5", "maven", &["--write-back"]);
    assert!(n.delete(&v5, &[]).ok().stdout.contains("nothing changed"));
    assert_eq!(n.generation("maven"), 2);

    let v6 = n.create("v6", "maven", &[]);
    assert_same_tree(&expected, &v6, "after discards");
    n.delete(&v6, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_fidelity_after_commit_and_squash() {
    if !root_or_skip("real_fidelity_after_commit_and_squash") {
        return;
    }
    // Only the current generation keeps its layers (the default keeps 3 for rollbacks).
    let n = Node::with_config("keep_generations = 1\n");
    let v1 = n.create("v1", "rich", &["--size", "256Mi", "--write-back"]);
    rich_tree(&v1, true);
    n.delete(&v1, &[]).ok();

    // Changes on top of a lower layer: copy-ups, whiteouts, opaque dirs, metadata-only changes.
    let v2 = n.create("v2", "rich", &["--size", "256Mi", "--write-back"]);
    sh(&format!(
        "cd {d}; chmod 640 a/file; chown 42:42 a/b/c/random; rm a/hardlink; rm -r empty; mkdir empty; \
         touch -d '2019-05-05 05:05:05.5' empty; echo more >> a/b/c/random; mv a/b/rel a/b/rel2; \
         mkdir -p new/deep; echo n > new/deep/n; ln new/deep/n new/n-link",
        d = v2.display()
    ));
    xattr::set(v2.join("a/b/c"), "user.changed", b"1").unwrap();
    let expected = snap(&v2);
    n.delete(&v2, &[]).ok();

    let v3 = n.create("v3", "rich", &[]);
    assert_same_tree(&expected, &v3, "after commit");
    n.delete(&v3, &[]).ok();

    let r = n
        .run(&["cache", "squash", "rich", "-o", "json"])
        .ok()
        .json();
    assert_eq!(r["outcome"], "squashed");
    assert_eq!(n.show("rich")["depth"], 1);
    let v4 = n.create("v4", "rich", &[]);
    assert_same_tree(&expected, &v4, "after squash");
    // Sparse files stay sparse: 50 MiB apparent, a few KiB allocated.
    let blocks =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(v4.join("sparse")).unwrap());
    assert!(
        blocks * 512 < 1 << 20,
        "sparse file allocates {} bytes",
        blocks * 512
    );
    n.delete(&v4, &[]).ok();
    // The old layers are gone from the disk once no volume uses them and no kept generation.
    let layers = std::fs::read_dir(n.state().join("caches/default/rich/layers"))
        .unwrap()
        .count();
    assert_eq!(layers, 1);
    n.assert_clean();
}

#[test]
fn real_idle_cache_is_squashed_by_gc_drain_with_its_tree_intact() {
    if !root_or_skip("real_idle_cache_is_squashed_by_gc_drain_with_its_tree_intact") {
        return;
    }
    let n = Node::with_config("squash_idle_seconds = 60\nkeep_generations = 1\n");
    let v1 = n.create("v1", "idle", &["--size", "256Mi", "--write-back"]);
    rich_tree(&v1, true);
    n.delete(&v1, &[]).ok();
    let v2 = n.create("v2", "idle", &["--size", "256Mi", "--write-back"]);
    sh(&format!(
        "cd {d}; echo more >> a/b/c/random; rm -r empty; mkdir -p new; echo n > new/n",
        d = v2.display()
    ));
    let expected = snap(&v2);
    n.delete(&v2, &[]).ok();
    assert_eq!(n.show("idle")["depth"], 2);

    // Used just now: a drain leaves it alone.
    n.run(&["gc", "--drain"]).ok();
    assert_eq!(n.show("idle")["depth"], 2, "a cache in use is not squashed");
    // Its last create two minutes ago: the next drain folds it into one layer.
    sh(&format!(
        "touch -d '-120 seconds' {}",
        n.state().join("caches/default/idle/last-used").display()
    ));
    n.run(&["gc", "--drain"]).ok();
    assert_eq!(n.show("idle")["depth"], 1, "an idle cache is squashed");
    let v3 = n.create("v3", "idle", &[]);
    assert_same_tree(&expected, &v3, "after the idle squash");
    n.delete(&v3, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_concurrent_volumes_of_one_cache() {
    if !root_or_skip("real_concurrent_volumes_of_one_cache") {
        return;
    }
    let n = Node::with_config("max_depth = 4\n");
    let seed = n.create("seed", "shared", &["--size", "64Mi", "--write-back"]);
    sh(&format!("echo seed > {}/seed", seed.display()));
    n.delete(&seed, &[]).ok();

    let handles: Vec<_> = (0..8)
        .map(|i| {
            let dir = n.vol(&format!("job{i}"));
            let bin = env!("CARGO_BIN_EXE_jobcachefs");
            let state = n.state();
            let cfg = n.config.clone().unwrap();
            std::thread::spawn(move || {
                let script = format!(
                    "set -e; {bin} volume create {d} --cache shared --size 64Mi --write-back >/dev/null; \
                     test \"$(cat {d}/seed)\" = seed; mkdir -p {d}/jobs; echo {i} > {d}/jobs/{i}; \
                     head -c 100000 /dev/urandom > {d}/blob-{i}; {bin} volume delete {d} >/dev/null",
                    d = dir.display()
                );
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .env("JOBCACHEFS_STATE_DIR", state)
                    .env("JOBCACHEFS_CONFIG", cfg)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "job failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    n.run(&["gc", "--drain"]).ok();
    let check = n.create("check", "shared", &[]);
    for i in 0..8 {
        assert_eq!(
            std::fs::read_to_string(check.join(format!("jobs/{i}"))).unwrap(),
            format!("{i}\n")
        );
        assert!(check.join(format!("blob-{i}")).exists());
    }
    assert_eq!(
        std::fs::read_to_string(check.join("seed")).unwrap(),
        "seed\n"
    );
    let show = n.show("shared");
    assert!(
        show["depth"].as_u64().unwrap() <= 4 + 1,
        "depth stays bounded: {show}"
    );
    assert!(show["generation"].as_u64().unwrap() >= 9);
    n.delete(&check, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_quotas() {
    if !root_or_skip("real_quotas") {
        return;
    }
    let n = Node::new();
    // ENOSPC inside the volume at its size; the host file never grows beyond it.
    let v = n.create(
        "small",
        "q",
        &["--size", "32Mi", "--cache-size", "48Mi", "--write-back"],
    );
    let out = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}/big", v.display()),
            "bs=1M",
            "count=64",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("No space left on device"));
    let vols = n.run(&["volume", "ls", "-o", "json"]).ok().json();
    let id = vols[0]["id"].as_str().unwrap();
    let img = n.state().join("volumes").join(id).join("upper.img");
    let md = std::fs::metadata(&img).unwrap();
    assert!(md.len() <= 32 << 20 && std::os::unix::fs::MetadataExt::blocks(&md) * 512 <= 32 << 20);
    std::fs::remove_file(v.join("big")).unwrap();
    sh(&format!(
        "head -c 20000000 /dev/urandom > {}/first",
        v.display()
    ));
    n.delete(&v, &[]).ok();
    assert_eq!(n.generation("q"), 1);

    // 20 MB in the cache plus 32 MB of incompressible data cannot fit 48 MiB, squashed or not.
    // (The first layer is trimmed before its commit: the 64 MiB that hit ENOSPC and were
    // deleted do not count, so the sizes alone must exceed the limit.)
    let v2 = n.create("over", "q", &["--size", "64Mi", "--write-back"]);
    sh(&format!(
        "head -c 32000000 /dev/urandom > {}/second",
        v2.display()
    ));
    let r = n.delete(&v2, &[]);
    assert_eq!(
        r.code, 3,
        "over-size commit must exit 3: {} {}",
        r.stdout, r.stderr
    );
    // The whole message; only the measured size varies (the unit test in commit.rs pins it).
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("rejected") && !l.starts_with('{'))
        .unwrap_or_default();
    let head = format!(
        "commit of {} into cache default/q rejected: the cache and this volume's changes allocate ",
        v2.display()
    );
    let tail = ", over the cache-size of 48.0 MiB, and squashed they still do not fit (the merged tree does not fit in 48.0 MiB); \
                the previous generation stays. Raise the limit (`jobcachefs cache resize q SIZE`) or write less";
    let size = line
        .split_once(&head)
        .and_then(|(_, rest)| rest.strip_suffix(tail))
        .unwrap_or_else(|| panic!("unexpected message: {line}"));
    assert!(
        size.ends_with(" MiB") && size[..size.len() - 4].parse::<f64>().unwrap() > 48.0,
        "{size}"
    );
    assert_eq!(n.generation("q"), 1, "the previous generation stays");
    let show = n.show("q");
    assert!(show["allocated"].as_u64().unwrap() <= 48 << 20);

    // An over-size commit that fits once squashed is squashed and published.
    let v3 = n.create("fits", "q", &["--size", "64Mi", "--write-back"]);
    sh(&format!(
        "rm {d}/first; head -c 32000000 /dev/urandom > {d}/third",
        d = v3.display()
    ));
    let r = n.delete(&v3, &["-o", "json"]).ok().json();
    assert_eq!(r["outcome"], "committed");
    assert_eq!(r["squashed"], true);
    let show = n.show("q");
    assert_eq!(show["depth"], 1);
    assert!(show["allocated"].as_u64().unwrap() <= 48 << 20);
    let v4 = n.create("see", "q", &[]);
    assert!(v4.join("third").exists() && !v4.join("first").exists());
    n.delete(&v4, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_idempotent_create_and_delete() {
    if !root_or_skip("real_idempotent_create_and_delete") {
        return;
    }
    let n = Node::new();
    let v = n.create("v", "idem", &["--size", "64Mi", "--write-back"]);
    sh(&format!("echo 1 > {}/f", v.display()));
    // Same request again: a no-op success, data intact.
    n.create("v", "idem", &["--size", "64Mi", "--write-back"]);
    assert_eq!(std::fs::read_to_string(v.join("f")).unwrap(), "1\n");
    // A conflicting request: a clear error, nothing changed.
    let r = n.run(&[
        "volume",
        "create",
        v.to_str().unwrap(),
        "--cache",
        "idem",
        "--size",
        "128Mi",
    ]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(v.join("f")).unwrap(), "1\n");

    n.delete(&v, &[]).ok();
    let again = n.delete(&v, &[]).ok();
    assert!(again.stdout.contains("already deleted"), "{}", again.stdout);
    assert_eq!(n.generation("idem"), 1, "one commit, not two");
    n.assert_clean();
}

#[test]
fn real_bad_input_changes_nothing() {
    if !root_or_skip("real_bad_input_changes_nothing") {
        return;
    }
    let n = Node::new();
    let dir = n.vol("x");
    let d = dir.to_str().unwrap();
    let long = "a".repeat(64);
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["volume", "create", d, "--cache", "../x"],
            2,
            "\"../x\"",
        ),
        (vec!["volume", "create", d, "--cache", "A_B"], 2, "\"A_B\""),
        (
            vec!["volume", "create", d, "--cache", ""],
            2,
            "cache name is empty",
        ),
        (
            vec!["volume", "create", d, "--cache", &long],
            2,
            "64 characters",
        ),
        (
            vec!["volume", "create", d, "--cache", "cachéü"],
            2,
            "\"cachéü\"",
        ),
        (
            vec![
                "volume",
                "create",
                d,
                "--cache",
                "c",
                "--namespace",
                "Bad_NS",
            ],
            2,
            "namespace \"Bad_NS\"",
        ),
        (
            vec!["volume", "create", d, "--cache", "c", "--size", "10Xi"],
            2,
            "\"10Xi\"",
        ),
        (
            vec!["volume", "create", d, "--cache", "c", "--size", "-1"],
            2,
            "\"-1\"",
        ),
        (
            vec!["volume", "create", d, "--cache", "c", "--size", "0"],
            2,
            "\"0\"",
        ),
        (
            vec!["volume", "create", d, "--cache", "c", "--size", "1Ki"],
            2,
            "below the minimum",
        ),
        (
            vec!["volume", "create", d, "--cache", "c", "--size", "900Ti"],
            3,
            "max_volume_size",
        ),
        (
            vec!["volume", "create", d, "--cache", "c", "--cache-size", "1Xi"],
            2,
            "\"1Xi\"",
        ),
        (
            vec!["volume", "create", d, "--write-back"],
            2,
            "needs a cache",
        ),
        (vec!["cache", "show", "nope"], 4, "does not exist"),
    ];
    for (args, code, needle) in cases {
        let r = n.run(&args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(needle),
            "{args:?}: expected {needle:?} in {}",
            r.stderr
        );
    }
    // Larger than the host's free space (with a max_volume_size that allows it).
    let big = Node::with_config("max_volume_size = \"1Ei\"\n");
    let r = big.run(&[
        "volume",
        "create",
        big.vol("b").to_str().unwrap(),
        "--cache",
        "c",
        "--size",
        "900Ti",
    ]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("free space"), "{}", r.stderr);

    // DIR that is a file, not empty, or inside the state dir.
    let file = n.tmp.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let full = n.tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("f"), "x").unwrap();
    let inside = n.state().join("caches/mine");
    for (p, needle) in [
        (&file, "is a file"),
        (&full, "is not empty"),
        (&inside, "overlaps the state dir"),
    ] {
        let r = n.run(&["volume", "create", p.to_str().unwrap(), "--cache", "c"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr.contains(needle) && r.stderr.contains(p.to_str().unwrap()),
            "{}",
            r.stderr
        );
    }
    // Nothing was made: no cache, no volume, no DIR, no mount.
    assert_eq!(
        n.run(&["cache", "ls", "-o", "json"]).ok().json(),
        serde_json::json!([])
    );
    assert_eq!(
        n.run(&["volume", "ls", "-o", "json"]).ok().json(),
        serde_json::json!([])
    );
    assert!(!dir.exists());
    assert_eq!(
        std::fs::read_dir(n.state().join("volumes"))
            .unwrap()
            .count(),
        0
    );
    n.assert_clean();
}

/// Steps at which a crash is injected (see src/fault.rs).
const CREATE_STEPS: &[&str] = &[
    "create:recorded",
    "create:image-made",
    "create:upper-mounted",
    "create:mounted",
];
const DELETE_STEPS: &[&str] = &[
    "delete:marked",
    "delete:overlay-unmounted",
    "delete:upper-unmounted",
    "commit:renamed",
    "commit:published",
    "delete:committed",
];
const SQUASH_STEPS: &[&str] = &[
    "squash:view-mounted",
    "squash:copied",
    "squash:renamed",
    "squash:published",
];

#[test]
fn real_crash_during_create_then_gc() {
    if !root_or_skip("real_crash_during_create_then_gc") {
        return;
    }
    let n = Node::new();
    let seed = n.create("seed", "crash", &["--size", "64Mi", "--write-back"]);
    sh(&format!("echo seed > {}/seed", seed.display()));
    n.delete(&seed, &[]).ok();
    for step in CREATE_STEPS {
        let dir = n.vol(&step.replace(':', "-"));
        let r = n.run_env(
            &[
                "volume",
                "create",
                dir.to_str().unwrap(),
                "--cache",
                "crash",
                "--size",
                "64Mi",
            ],
            &[("JOBCACHEFS_CRASH_AT", step)],
        );
        assert_eq!(
            r.code,
            128 + 9,
            "{step}: expected SIGKILL, got {} {}",
            r.code,
            r.stderr
        );
        n.run(&["gc"]).ok();
        n.assert_clean();
        assert_eq!(
            n.run(&["volume", "ls", "-o", "json"]).ok().json(),
            serde_json::json!([]),
            "{step}"
        );
        // The same create now succeeds and sees the cache.
        n.create(&step.replace(':', "-"), "crash", &["--size", "64Mi"]);
        assert!(dir.join("seed").exists(), "{step}");
        n.delete(&dir, &[]).ok();
    }
    assert_eq!(n.generation("crash"), 1);
    n.assert_clean();
}

#[test]
fn real_crash_during_delete_then_gc_or_retry() {
    if !root_or_skip("real_crash_during_delete_then_gc_or_retry") {
        return;
    }
    // Deep enough that no squash (which publishes a generation of its own) runs in between.
    let n = Node::with_config("max_depth = 64\n");
    for (i, step) in DELETE_STEPS.iter().enumerate() {
        for finish_with_gc in [true, false] {
            let before = n.generation("crash");
            let name = format!("{}-{finish_with_gc}", step.replace(':', "-"));
            let dir = n.create(&name, "crash", &["--size", "64Mi", "--write-back"]);
            sh(&format!("echo {i} > {}/{name}", dir.display()));
            let r = n.run_env(
                &["volume", "delete", dir.to_str().unwrap()],
                &[("JOBCACHEFS_CRASH_AT", step)],
            );
            assert_eq!(r.code, 128 + 9, "{step}: {}", r.stderr);
            let g = n.generation("crash");
            assert!(
                g == before || g == before + 1,
                "{step}: generation {g} after {before}"
            );
            if finish_with_gc {
                n.run(&["gc"]).ok();
            } else {
                n.delete(&dir, &[]).ok();
            }
            n.assert_clean();
            // Finished exactly once: the file is in the cache and the generation moved by one.
            assert_eq!(
                n.generation("crash"),
                before + 1,
                "{step} (gc: {finish_with_gc})"
            );
            let check = n.create("check", "crash", &[]);
            assert!(check.join(&name).exists(), "{step}: committed file missing");
            n.delete(&check, &[]).ok();
            // A further delete is a no-op.
            assert!(n.delete(&dir, &[]).ok().stdout.contains("already deleted"));
        }
    }
    n.assert_clean();
}

#[test]
fn real_crash_during_squash_then_gc() {
    if !root_or_skip("real_crash_during_squash_then_gc") {
        return;
    }
    let n = Node::new();
    for i in 0..3 {
        let v = n.create(&format!("w{i}"), "sq", &["--size", "64Mi", "--write-back"]);
        sh(&format!("echo {i} > {}/f{i}", v.display()));
        n.delete(&v, &[]).ok();
    }
    let live = n.create("live", "sq", &[]);
    for step in SQUASH_STEPS {
        let pre = n.create("pre", "sq", &[]);
        let expected = snap(&pre);
        n.delete(&pre, &[]).ok();
        let before = n.show("sq");
        let r = n.run_env(&["cache", "squash", "sq"], &[("JOBCACHEFS_CRASH_AT", step)]);
        assert_eq!(r.code, 128 + 9, "{step}: {}", r.stderr);
        let after = n.show("sq");
        let (g0, g1) = (
            before["generation"].as_u64().unwrap(),
            after["generation"].as_u64().unwrap(),
        );
        assert!(g1 == g0 || g1 == g0 + 1, "{step}");
        n.run(&["gc"]).ok();
        // The cache is whole at either generation, and the live volume still reads.
        let c = n.create("check", "sq", &[]);
        assert_same_tree(&expected, &c, step);
        n.delete(&c, &[]).ok();
        assert_eq!(
            std::fs::read_to_string(live.join("f0")).unwrap(),
            "0\n",
            "{step}"
        );
        if g1 == g0 + 1 {
            assert_eq!(after["depth"], 1, "{step}");
            // Published: make the stack deep again for the next step.
            for i in 0..2 {
                let v = n.create(
                    &format!("again{i}"),
                    "sq",
                    &["--size", "64Mi", "--write-back"],
                );
                sh(&format!(
                    "touch {}/.keep{i}-{}",
                    v.display(),
                    step.replace(':', "-")
                ));
                n.delete(&v, &[]).ok();
            }
        } else {
            assert_eq!(after["depth"], before["depth"], "{step}");
        }
        let tmp = n.state().join("caches/default/sq/tmp");
        assert_eq!(
            std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0),
            0,
            "{step}: half-built image left"
        );
        let squash_mounts: Vec<_> = n
            .mounts()
            .into_iter()
            .filter(|m| m.to_string_lossy().contains("/mnt/squash/"))
            .collect();
        assert!(squash_mounts.is_empty(), "{step}: {squash_mounts:?}");
    }
    n.delete(&live, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_squash_does_not_block_create_or_commit() {
    if !root_or_skip("real_squash_does_not_block_create_or_commit") {
        return;
    }
    let n = Node::new();
    for i in 0..3 {
        let v = n.create(
            &format!("w{i}"),
            "busy",
            &["--size", "64Mi", "--write-back"],
        );
        sh(&format!("echo {i} > {}/f{i}", v.display()));
        n.delete(&v, &[]).ok();
    }
    // Hold a squash in the middle of its copy, after it let go of the cache lock.
    let gate = n.tmp.path().join("gate");
    std::fs::write(&gate, b"").unwrap();
    let mut squash = n.command();
    squash
        .args(["cache", "squash", "busy"])
        .env("JOBCACHEFS_PAUSE_AT", "squash:view-mounted")
        .env("JOBCACHEFS_PAUSE_FILE", &gate);
    let mut child = squash.spawn().unwrap();
    let reached = n.tmp.path().join("gate.reached");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !reached.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "squash never reached its pause point"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Meanwhile a job creates, writes and commits: it must not wait for the squash (it would hang
    // here if the squash held the cache lock while copying).
    let v = n.create("during", "busy", &["--size", "64Mi", "--write-back"]);
    assert!(v.join("f2").exists());
    sh(&format!(
        "echo during > {}/during; rm {}/f0",
        v.display(),
        v.display()
    ));
    n.delete(&v, &[]).ok();
    assert_eq!(n.generation("busy"), 4);
    std::fs::remove_file(&gate).unwrap();
    assert!(child.wait().unwrap().success());
    // The squash published a base of generations 1-3 with the commit made meanwhile on top.
    let s = n.show("busy");
    assert_eq!(s["generation"], 5);
    assert_eq!(s["depth"], 2);
    let c = n.create("check", "busy", &[]);
    assert!(c.join("during").exists() && c.join("f1").exists() && !c.join("f0").exists());
    n.delete(&c, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_concurrent_volumes_keep_their_generation_and_last_writer_wins() {
    if !root_or_skip("real_concurrent_volumes_keep_their_generation_and_last_writer_wins") {
        return;
    }
    let n = Node::new();
    let seed = n.create("seed", "lw", &["--size", "64Mi", "--write-back"]);
    sh(&format!(
        "echo seed > {d}/same; echo keep > {d}/keep",
        d = seed.display()
    ));
    n.delete(&seed, &[]).ok();
    let a = n.create("a", "lw", &["--size", "64Mi", "--write-back"]);
    let b = n.create("b", "lw", &["--size", "64Mi", "--write-back"]);
    sh(&format!(
        "echo a > {d}/same; echo a > {d}/only-a",
        d = a.display()
    ));
    sh(&format!("echo b > {d}/same; rm {d}/keep", d = b.display()));
    n.delete(&a, &[]).ok();
    // b still sees the generation it started on, not a's commit.
    assert_eq!(std::fs::read_to_string(b.join("same")).unwrap(), "b\n");
    assert!(!b.join("only-a").exists());
    n.delete(&b, &[]).ok();
    let c = n.create("c", "lw", &[]);
    assert_eq!(
        std::fs::read_to_string(c.join("same")).unwrap(),
        "b\n",
        "the last writer wins"
    );
    assert_eq!(
        std::fs::read_to_string(c.join("only-a")).unwrap(),
        "a\n",
        "a's other file stays"
    );
    assert!(!c.join("keep").exists(), "b's deletion applies");
    n.delete(&c, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_delete_waits_for_users_in_other_mount_namespaces() {
    if !root_or_skip("real_delete_waits_for_users_in_other_mount_namespaces") {
        return;
    }
    let n = Node::new();
    let v = n.create("held", "ns-held", &["--size", "64Mi", "--write-back"]);
    sh(&format!("echo 1 > {}/f", v.display()));
    // A process in its own mount namespace keeps a copy of every mount, the volume's included,
    // as a pod that was not torn down would. It lets go of every other test's mounts at once:
    // tests run in parallel, and their deletes must not wait for this one's holder.
    let own = n.tmp.path().display().to_string();
    let mut holder = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "findmnt -rn -o TARGET | grep '^/tmp/jcfs-test-' | grep -v '^{own}' | sort -r \
             | while read -r m; do umount -l \"$m\" 2>/dev/null; done; exec sleep 120"
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = n.delete(&v, &[]);
    assert_eq!(r.code, 5, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("still in use"), "{}", r.stderr);
    assert_eq!(
        n.generation("ns-held"),
        0,
        "nothing published while the image is in use"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    // Once its users are gone, the retried delete commits.
    let r = n.delete(&v, &["-o", "json"]).ok().json();
    assert_eq!(r["outcome"], "committed", "{r}");
    let c = n.create("check", "ns-held", &[]);
    assert_eq!(std::fs::read_to_string(c.join("f")).unwrap(), "1\n");
    n.delete(&c, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_deleted_data_is_not_committed() {
    if !root_or_skip("real_deleted_data_is_not_committed") {
        return;
    }
    let n = Node::new();
    let v = n.create("scratch", "trimmed", &["--size", "1Gi", "--write-back"]);
    // A job that writes 500 MiB of temporary files (on disk: synced), deletes them and keeps
    // one small file.
    sh(&format!(
        "cd {}; head -c 524288000 /dev/urandom > tmp.bin; sync; rm tmp.bin; echo hello > kept",
        v.display()
    ));
    let r = n.delete(&v, &["-o", "json"]).ok().json();
    assert_eq!(r["outcome"], "committed", "{r}");
    let show = n.show("trimmed");
    let allocated = show["allocated"].as_u64().unwrap();
    assert!(
        allocated <= 8 << 20,
        "the committed layer allocates {allocated} bytes: what the job deleted must not be kept"
    );
    let c = n.create("check", "trimmed", &[]);
    assert_eq!(std::fs::read_to_string(c.join("kept")).unwrap(), "hello\n");
    assert!(!c.join("tmp.bin").exists());
    n.delete(&c, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_volume_journal_is_given_back_at_commit_and_a_crash_is_seen() {
    if !root_or_skip("real_volume_journal_is_given_back_at_commit_and_a_crash_is_seen") {
        return;
    }
    use jobcachefs::host::image;
    let n = Node::new();
    // The default size (2 GiB): an upper with a journal, mounted for it.
    let v = n.create("rebuild", "journal", &["--write-back"]);
    let vols = n.run(&["volume", "ls", "-o", "json"]).ok().json();
    let id = vols[0]["id"].as_str().unwrap().to_string();
    let img = n.state().join("volumes").join(&id).join("upper.img");
    let upper = n.state().join("mnt/uppers").join(&id);
    let out = std::process::Command::new("findmnt")
        .args(["-n", "-o", "OPTIONS", "--target"])
        .arg(&upper)
        .output()
        .unwrap();
    let options = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        options.contains("data=writeback") && options.contains("journal_async_commit"),
        "{options}"
    );
    // A job that cleans and rebuilds a tree: the journal is written.
    sh(&format!(
        "cd {}; for pass in 1 2 3; do rm -rf t; mkdir t; for d in $(seq 30); do mkdir t/$d; \
         for f in $(seq 100); do echo $pass > t/$d/$f; done; done; sync; done",
        v.display()
    ));
    let used = image::journal_allocated(&img).unwrap();
    assert!(used > 1 << 20, "{used} bytes of the journal written");
    // What a node crash leaves (a copy of the mounted image): not clean, nothing given back.
    let crashed = n.state().join("crashed.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        img.display(),
        crashed.display()
    ));
    assert!(!image::is_clean(&crashed).unwrap());
    assert_eq!(image::release_journal(&crashed).unwrap(), 0);
    std::fs::remove_file(&crashed).unwrap();
    // The commit gives the journal back, all but its superblock.
    let r = n.delete(&v, &["-o", "json"]).ok().json();
    assert_eq!(r["outcome"], "committed", "{r}");
    let layers = n.state().join("caches/default/journal/layers");
    let layer = std::fs::read_dir(&layers)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(image::is_clean(&layer).unwrap());
    assert_eq!(image::journal_allocated(&layer).unwrap(), 4096);
    let c = n.create("check", "journal", &[]);
    assert_eq!(std::fs::read_to_string(c.join("t/30/100")).unwrap(), "3\n");
    n.delete(&c, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_layer_mounts_stay_after_the_last_volume() {
    if !root_or_skip("real_layer_mounts_stay_after_the_last_volume") {
        return;
    }
    let n = Node::with_config("layer_keep_seconds = 600\n");
    let v = n.create("seed", "kept", &["--size", "64Mi", "--write-back"]);
    sh(&format!("echo seed > {}/seed", v.display()));
    n.delete(&v, &[]).ok();
    let layers = n.state().join("mnt/layers");
    let layer_mounts = |n: &Node| -> Vec<std::path::PathBuf> {
        n.mounts()
            .into_iter()
            .filter(|m| m.starts_with(&layers))
            .collect()
    };
    let v = n.create("reader", "kept", &[]);
    let mounted = layer_mounts(&n);
    assert_eq!(mounted.len(), 1);
    n.delete(&v, &[]).ok();
    assert_eq!(layer_mounts(&n), mounted, "kept after the last volume");
    n.run(&["gc"]).ok();
    assert_eq!(layer_mounts(&n), mounted, "kept by gc while recent");
    let v = n.create("again", "kept", &[]);
    assert_eq!(std::fs::read_to_string(v.join("seed")).unwrap(), "seed\n");
    n.delete(&v, &[]).ok();
    let vols = n.vol("");
    assert!(
        !n.mounts().iter().any(|m| m.starts_with(&vols)),
        "the volumes themselves are gone"
    );

    // Past the keep (the cache's last create long ago), gc releases it.
    sh(&format!(
        "touch -d 2000-01-01 {}",
        n.state().join("caches/default/kept/last-used").display()
    ));
    n.run(&["gc"]).ok();
    assert_eq!(layer_mounts(&n), Vec::<std::path::PathBuf>::new());

    // `cache rm` releases it at once.
    let v = n.create("last", "kept", &[]);
    n.delete(&v, &[]).ok();
    assert_eq!(layer_mounts(&n).len(), 1);
    n.run(&["cache", "rm", "kept", "--yes"]).ok();
    n.assert_clean();
}
