//! The metadata squash (issue 31) on real loop devices, ext4 and overlayfs with data-only
//! layers: the merged view through a metadata base is the view of the stack it replaced, entry
//! by entry and byte by byte; a volume over it commits whole files; a SIGKILL at each step
//! leaves the old or the new generation; the fallback where the kernel lacks data-only layers;
//! a metadata base never travels to a registry as such.

mod common;

use common::{assert_same_tree, rich_tree, root_or_skip, sh, snap, Node};

/// A cache of three layers with every kind of entry, copy-ups, whiteouts, opaque dirs, renamed
/// dirs and hardlinks; returns the view a volume shows of it.
fn three_layers(n: &Node, cache: &str) -> jobcachefs::files::tree::Snapshot {
    three_layers_with(n, cache, true)
}

/// [`three_layers`]; `host_refs` adds a device node and an absolute link (which registry
/// import refuses by default).
fn three_layers_with(n: &Node, cache: &str, host_refs: bool) -> jobcachefs::files::tree::Snapshot {
    let v = n.create("l1", cache, &["--size", "256Mi", "--write-back"]);
    rich_tree(&v, host_refs);
    n.delete(&v, &[]).ok();
    let v = n.create("l2", cache, &["--size", "256Mi", "--write-back"]);
    sh(&format!(
        "cd {d}; chmod 640 a/file; chown 42:42 a/b/c/random; rm a/hardlink; rm -r empty; mkdir empty; \
         touch -d '2019-05-05 05:05:05.5' empty; echo more >> a/b/c/random; mv a/b/rel a/b/rel2; \
         mkdir -p new/deep; echo n > new/deep/n; ln new/deep/n new/n-link; head -c 70000 /dev/urandom > big",
        d = v.display()
    ));
    xattr::set(v.join("a/b/c"), "user.changed", b"1").unwrap();
    n.delete(&v, &[]).ok();
    let v = n.create("l3", cache, &["--size", "256Mi", "--write-back"]);
    sh(&format!(
        "cd {d}; rm -rf a/b/c; mkdir a/b/c; echo again > a/b/c/n2; echo over > big; \
         mv a moved-a; printf x > a-file-now",
        d = v.display()
    ));
    let want = snap(&v);
    n.delete(&v, &[]).ok();
    want
}

fn show_layers(n: &Node, cache: &str) -> (usize, usize) {
    let s = n.show(cache);
    let l = s["layers"].as_array().unwrap();
    let data = l
        .first()
        .and_then(|b| b["data"].as_array())
        .map_or(0, |d| d.len());
    (l.len(), data)
}

#[test]
fn real_metadata_squash_shows_the_same_tree_and_commits_whole_files() {
    if !root_or_skip("real_metadata_squash_shows_the_same_tree_and_commits_whole_files") {
        return;
    }
    same_tree_and_whole_files(&[], true);
}

/// The ext4 metadata base, which kernels without EROFS get: forced here.
#[test]
fn real_an_ext4_metadata_base_shows_the_same_tree_and_commits_whole_files() {
    if !root_or_skip("real_an_ext4_metadata_base_shows_the_same_tree_and_commits_whole_files") {
        return;
    }
    same_tree_and_whole_files(&[("JOBCACHEFS_NO_EROFS", "1")], false);
}

/// Whether the image of the cache's base layer is EROFS (else it is ext4).
fn base_is_erofs(n: &Node, cache: &str) -> bool {
    let id = n.show(cache)["layers"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = n
        .state()
        .join(format!("caches/default/{cache}/layers/{id}.img"));
    let erofs = jobcachefs::files::erofs::is_erofs(&img);
    if erofs {
        // An independent reader of the format: erofs-utils' fsck decodes every inode,
        // directory and xattr (its --extract walks the whole tree).
        let out = std::process::Command::new("fsck.erofs")
            .arg("--extract")
            .arg(&img)
            .output()
            .expect("fsck.erofs (erofs-utils, scripts/setup installs it)");
        assert!(
            out.status.success(),
            "fsck.erofs {}: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    erofs
}

fn same_tree_and_whole_files(env: &[(&str, &str)], erofs: bool) {
    let n = Node::with_config("keep_generations = 1\n");
    let want = three_layers(&n, "rich");
    let r = n
        .run_env(
            &["cache", "squash", "rich", "--metadata", "-o", "json"],
            env,
        )
        .ok()
        .json();
    assert_eq!(base_is_erofs(&n, "rich"), erofs, "the base's format");
    assert_eq!(r["outcome"], "squashed", "{r}");
    assert_eq!(
        show_layers(&n, "rich"),
        (1, 3),
        "one metadata base over the 3 layers"
    );
    let hist = n
        .run(&["cache", "history", "rich", "-o", "json"])
        .ok()
        .json();
    assert_eq!(hist[0]["kind"], "metadata-squash", "{hist}");
    // The base holds no data: its image allocates far less than the data layers.
    let base = n.show("rich")["layers"][0].clone();
    let base_alloc = base["allocated"].as_u64().unwrap();
    assert!(base_alloc < 8 << 20, "{base}");

    // Entry by entry and byte by byte (the snapshot hashes every file and maps sparse extents).
    let v = n.create("v", "rich", &["--size", "256Mi", "--write-back"]);
    assert_same_tree(&want, &v, "through the metadata base");
    let table = jobcachefs::host::mounts::mount_table().unwrap();
    let m = table.iter().rev().find(|m| m.mount_point == v).unwrap();
    let view = jobcachefs::host::mounts::parse_overlay(&m.super_options);
    assert_eq!(
        (view.lowers.len(), view.data.len()),
        (1, 3),
        "{}",
        m.super_options
    );
    // A job rewrites a stubbed file: the commit's layer holds the whole file, no stub.
    sh(&format!(
        "cd {}; echo tail >> a-file-now; touch big",
        v.display()
    ));
    n.delete(&v, &[]).ok();
    let top = n.show("rich")["layers"][1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = n
        .state()
        .join(format!("caches/default/rich/layers/{top}.img"));
    let mnt = n.tmp.path().join("inspect");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -o ro,loop {} {}",
        img.display(),
        mnt.display()
    ));
    let upper = mnt.join("upper");
    let body = std::fs::read(upper.join("a-file-now"));
    let big = std::fs::metadata(upper.join("big")).map(|m| m.len());
    let stub = xattr::get(upper.join("a-file-now"), "trusted.overlay.metacopy");
    sh(&format!("umount {}", mnt.display()));
    assert_eq!(body.unwrap(), b"xtail\n", "the committed file is whole");
    assert_eq!(big.unwrap(), 5, "a copied-up file carries its data");
    assert_eq!(stub.unwrap(), None, "a commit never holds a metacopy stub");
    let v = n.create("again", "rich", &[]);
    assert_eq!(
        std::fs::read_to_string(v.join("a-file-now")).unwrap(),
        "xtail\n"
    );
    n.delete(&v, &[]).ok();

    // A metadata squash over a metadata base, then a full squash: the same tree, and the
    // full squash leaves no data layer behind.
    let v = n.create("w", "rich", &[]);
    let want = snap(&v);
    n.delete(&v, &[]).ok();
    n.run_env(&["cache", "squash", "rich", "--metadata"], env)
        .ok();
    assert_eq!(show_layers(&n, "rich"), (1, 4));
    assert_eq!(base_is_erofs(&n, "rich"), erofs, "the base's format");
    let v = n.create("x", "rich", &[]);
    assert_same_tree(&want, &v, "after a second metadata squash");
    n.delete(&v, &[]).ok();
    n.run(&["cache", "squash", "rich", "--full"]).ok();
    assert_eq!(show_layers(&n, "rich"), (1, 0));
    let v = n.create("y", "rich", &[]);
    assert_same_tree(&want, &v, "after a full squash of the metadata base");
    n.delete(&v, &[]).ok();
    let files = std::fs::read_dir(n.state().join("caches/default/rich/layers"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "the data layers went with the metadata base");
    n.assert_clean();
}

const SQUASH_STEPS: [&str; 4] = [
    "squash:view-mounted",
    "squash:copied",
    "squash:renamed",
    "squash:published",
];

#[test]
fn real_a_killed_metadata_squash_leaves_old_or_new_and_gc_repairs() {
    if !root_or_skip("real_a_killed_metadata_squash_leaves_old_or_new_and_gc_repairs") {
        return;
    }
    let n = Node::new();
    let want = three_layers(&n, "c");
    for step in SQUASH_STEPS {
        let before = show_layers(&n, "c");
        let r = n.run_env(
            &["cache", "squash", "c", "--metadata"],
            &[("JOBCACHEFS_CRASH_AT", step)],
        );
        assert_eq!(r.code, 128 + 9, "{step}: {}", r.stderr);
        let after = show_layers(&n, "c");
        assert!(
            after == before || after.0 == 1,
            "{step}: {before:?} -> {after:?}"
        );
        n.run(&["gc"]).ok();
        let v = n.create("check", "c", &[]);
        assert_same_tree(&want, &v, step);
        n.delete(&v, &[]).ok();
        n.assert_clean();
        // Back to three layers for the next step.
        if show_layers(&n, "c").0 == 1 {
            let v = n.create("more", "c", &["--write-back"]);
            std::fs::write(v.join(format!("more-{}", step.replace(':', "-"))), "m").unwrap();
            n.delete(&v, &[]).ok();
        }
    }
    n.assert_clean();
}

#[test]
fn real_without_data_layers_the_squash_is_full_and_a_metadata_one_is_refused() {
    if !root_or_skip("real_without_data_layers_the_squash_is_full_and_a_metadata_one_is_refused") {
        return;
    }
    let n = Node::with_config("squash_method = \"metadata\"\n");
    let want = three_layers(&n, "c");
    let off = [("JOBCACHEFS_NO_DATA_LAYERS", "1")];
    let r = n.run_env(&["cache", "squash", "c", "--metadata"], &off);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("Linux 6.16+"), "{}", r.stderr);
    assert_eq!(
        show_layers(&n, "c"),
        (3, 0),
        "a refused squash changed the cache"
    );
    // squash_method = "metadata" falls back to a full squash, and says why.
    let r = n.run_env(&["cache", "squash", "c"], &off).ok();
    assert!(r.stderr.contains("full squash instead"), "{}", r.stderr);
    assert_eq!(show_layers(&n, "c"), (1, 0));
    let v = n.create("v", "c", &[]);
    assert_same_tree(&want, &v, "after the fallback");
    n.delete(&v, &[]).ok();
    // Where the kernel has them, the same config makes metadata bases.
    let v = n.create("w", "c", &["--write-back"]);
    std::fs::write(v.join("w"), "w").unwrap();
    n.delete(&v, &[]).ok();
    n.run(&["cache", "squash", "c"]).ok();
    assert_eq!(show_layers(&n, "c"), (1, 2));
    n.assert_clean();
}

#[test]
fn real_a_metadata_base_is_synced_as_whole_files() {
    if !root_or_skip("real_a_metadata_base_is_synced_as_whole_files") {
        return;
    }
    let reg = common::registry::Registry::start();
    let a = Node::new();
    let want = three_layers_with(&a, "c", false);
    a.run(&["cache", "squash", "c", "--metadata"]).ok();
    assert_eq!(show_layers(&a, "c"), (1, 3));
    let image = reg.image("default", "c");
    // Configured for a registry, a cache is never metadata-squashed.
    let b = Node::with_config(&reg.config(""));
    let v = b.create("seed", "c", &["--write-back"]);
    std::fs::write(v.join("s"), "s").unwrap();
    b.delete(&v, &[]).ok();
    let v = b.create("seed2", "c", &["--write-back"]);
    std::fs::write(v.join("t"), "t").unwrap();
    b.delete(&v, &[]).ok();
    let r = b.run(&["cache", "squash", "c", "--metadata"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("a registry syncs it"), "{}", r.stderr);
    // A's metadata base (made before any registry) is squashed fully on export.
    a.run(&[
        "cache",
        "export",
        "c",
        "--image",
        &image,
        "--tls-verify=false",
    ])
    .ok();
    assert_eq!(show_layers(&a, "c"), (1, 0));
    let c = Node::new();
    c.run(&[
        "cache",
        "import",
        "c",
        "--image",
        &image,
        "--tls-verify=false",
    ])
    .ok();
    let v = c.create("v", "c", &[]);
    let got = snap(&v);
    c.delete(&v, &[]).ok();
    // Compare paths, kinds and file contents (the sync tests check the rest of the metadata).
    let names =
        |s: &jobcachefs::files::tree::Snapshot| -> Vec<(std::path::PathBuf, char, Option<String>)> {
            s.iter()
                .map(|(p, e)| (p.clone(), e.kind, e.digest.clone()))
                .collect()
        };
    assert_eq!(names(&got), names(&want));
    for n in [&a, &b, &c] {
        n.assert_clean();
    }
}
