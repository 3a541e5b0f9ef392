//! The metadata squash (issue 31) on real loop devices, ext4 and overlayfs with data-only
//! layers: the merged view through a metadata base is the view of the stack it replaced, entry
//! by entry and byte by byte; a volume over it commits whole files; a SIGKILL at each step
//! leaves the old or the new generation; the fallback where the kernel lacks data-only layers;
//! a metadata base never travels to a registry as such.

mod common;

use common::{assert_same_tree, rich_tree, root_or_skip, sh, snap, Node, Rng};

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
    same_tree_and_whole_files(&[], Format::Mapped);
}

/// The EROFS base of stubs over data-only layers, which kernels that cannot mount an EROFS
/// file with devices get: forced here.
#[test]
fn real_a_stub_metadata_base_shows_the_same_tree_and_commits_whole_files() {
    if !root_or_skip("real_a_stub_metadata_base_shows_the_same_tree_and_commits_whole_files") {
        return;
    }
    same_tree_and_whole_files(&[("JOBCACHEFS_NO_EROFS_MAPPED", "1")], Format::Stubs);
}

/// The ext4 metadata base, which kernels without EROFS get: forced here.
#[test]
fn real_an_ext4_metadata_base_shows_the_same_tree_and_commits_whole_files() {
    if !root_or_skip("real_an_ext4_metadata_base_shows_the_same_tree_and_commits_whole_files") {
        return;
    }
    same_tree_and_whole_files(&[("JOBCACHEFS_NO_EROFS", "1")], Format::Ext4);
}

/// A metadata base's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// EROFS, its files' chunks on the data layers' images (its devices).
    Mapped,
    /// EROFS stubs over data-only layers.
    Stubs,
    /// ext4 stubs over data-only layers.
    Ext4,
}

/// The format of the cache's base layer (checked by an independent reader when EROFS).
fn base_format(n: &Node, cache: &str) -> Format {
    let id = n.show(cache)["layers"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = n
        .state()
        .join(format!("caches/default/{cache}/layers/{id}.img"));
    let erofs = jobcachefs::files::erofs::is_erofs(&img);
    let devices = if erofs {
        jobcachefs::files::erofs::device_tags(&img).unwrap()
    } else {
        Vec::new()
    };
    if erofs {
        // An independent reader of the format: erofs-utils' fsck decodes every inode,
        // directory and xattr (its --extract walks the whole tree, and reads every file's
        // chunks from the data layers' images when the base maps them).
        let out = std::process::Command::new("fsck.erofs")
            .arg("--extract")
            .args(
                devices
                    .iter()
                    .map(|t| format!("--device={}", img.with_file_name(t).display())),
            )
            .arg(&img)
            .output()
            .expect("fsck.erofs (erofs-utils, scripts/setup installs it)");
        assert!(
            out.status.success(),
            "fsck.erofs {}: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // Mounted by itself: readdir shows every entry of its root and of `upper`, `.` and
        // `..` included (glibc drops entries whose inode number is 0).
        let mnt = n.tmp.path().join("erofs-check");
        std::fs::create_dir_all(&mnt).unwrap();
        jobcachefs::host::mounts::mount_image(&img, &mnt, true).unwrap();
        let listed = std::process::Command::new("ls")
            .args(["-a1i"])
            .arg(&mnt)
            .arg(mnt.join("upper"))
            .output()
            .unwrap();
        sh(&format!("umount {}", mnt.display()));
        let listed = String::from_utf8_lossy(&listed.stdout).to_string();
        let dots = listed
            .lines()
            .filter(|l| l.ends_with(" .") || l.ends_with(" .."))
            .count();
        assert_eq!(dots, 4, "{listed}");
        assert!(
            !listed.lines().any(|l| l.trim_start().starts_with("0 ")),
            "{listed}"
        );
    }
    match (erofs, devices.is_empty()) {
        (true, false) => Format::Mapped,
        (true, true) => Format::Stubs,
        _ => Format::Ext4,
    }
}

fn same_tree_and_whole_files(env: &[(&str, &str)], format: Format) {
    let n = Node::with_config("keep_generations = 1\n");
    let want = three_layers(&n, "rich");
    let r = n
        .run_env(
            &["cache", "squash", "rich", "--metadata", "-o", "json"],
            env,
        )
        .ok()
        .json();
    assert_eq!(base_format(&n, "rich"), format, "the base's format");
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
    // A mapped base reads its data layers' images itself: no data-only layer, none mounted.
    let data = if format == Format::Mapped { 0 } else { 3 };
    assert_eq!(
        (view.lowers.len(), view.data.len()),
        (1, data),
        "{}",
        m.super_options
    );
    let layer_mounts = table
        .iter()
        .filter(|m| {
            m.mount_point
                .starts_with(n.state().join("mnt/layers/default/rich"))
        })
        .count();
    assert_eq!(
        layer_mounts,
        1 + data,
        "the base and the data layers it needs mounted"
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
    // Through idmapped layer mounts (a volume of its own identity): the same names and bytes
    // (of what the idmap lets root read: files of owners it does not map are nobody's).
    let ids = n.create("ids", "rich", &["--unique-ids"]);
    let names = |d: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&ids), names(&v));
    assert_eq!(
        std::fs::read_to_string(ids.join("a-file-now")).unwrap(),
        "xtail\n"
    );
    n.delete(&ids, &[]).ok();
    n.delete(&v, &[]).ok();

    // A metadata squash over a metadata base, then a full squash: the same tree, and the
    // full squash leaves no data layer behind.
    let v = n.create("w", "rich", &[]);
    let want = snap(&v);
    n.delete(&v, &[]).ok();
    n.run_env(&["cache", "squash", "rich", "--metadata"], env)
        .ok();
    assert_eq!(show_layers(&n, "rich"), (1, 4));
    assert_eq!(base_format(&n, "rich"), format, "the base's format");
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
    let off = [
        ("JOBCACHEFS_NO_DATA_LAYERS", "1"),
        ("JOBCACHEFS_NO_EROFS_MAPPED", "1"),
    ];
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

/// What the cache must show: every regular file's bytes and every directory, by path.
#[derive(Default, Clone, PartialEq, Debug)]
struct Model {
    files: std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
    dirs: std::collections::BTreeSet<std::path::PathBuf>,
}

impl Model {
    /// The model of what `root` shows (symlinks and other kinds are not generated).
    fn read(root: &std::path::Path) -> Model {
        let mut m = Model::default();
        let mut stack = vec![std::path::PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in std::fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let r = rel.join(e.file_name());
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                if md.is_dir() {
                    m.dirs.insert(r.clone());
                    stack.push(r);
                } else if md.is_symlink() {
                    // A symlink stands in the model as its target.
                    let t = std::fs::read_link(e.path()).unwrap();
                    m.files.insert(r, t.into_os_string().into_encoded_bytes());
                } else {
                    m.files.insert(r, std::fs::read(e.path()).unwrap());
                }
            }
        }
        m
    }

    fn parents(&mut self, rel: &std::path::Path) {
        let mut p = rel.parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            self.dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
}

/// One job's random changes in the volume at `v`, mirrored in `model`: new files (some in a
/// directory of hundreds of entries, some with 255-byte names, some sparse), rewrites, appends,
/// deletes, `rm -rf` and renames of directories, hardlinks.
fn random_job(rng: &mut Rng, v: &std::path::Path, model: &mut Model) {
    use std::io::Write;
    let long = "n".repeat(250);
    let names = [
        "a",
        "b.txt",
        "z",
        "-dash",
        "a.b.c",
        long.as_str(),
        "ü-utf8",
        "x y",
    ];
    let dirs = ["", "d0", "d0/s", "d1", "d1/s/t", "d2"];
    for _ in 0..rng.below(30) + 5 {
        let existing: Vec<_> = model.files.keys().cloned().collect();
        match rng.below(10) {
            0..=3 => {
                let rel = std::path::Path::new(rng.pick(&dirs)).join(format!(
                    "{}{}",
                    rng.pick(&names),
                    rng.below(4)
                ));
                if model.dirs.contains(&rel) {
                    continue;
                }
                std::fs::create_dir_all(v.join(&rel).parent().unwrap()).unwrap();
                let len = rng.below(9000);
                let body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                std::fs::write(v.join(&rel), &body).unwrap();
                let mut body = body;
                if rng.below(5) == 0 {
                    // Sparse: a 1 MiB hole, then a byte.
                    let f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(v.join(&rel))
                        .unwrap();
                    let end = len as u64 + (1 << 20);
                    f.set_len(end).unwrap();
                    std::os::unix::fs::FileExt::write_all_at(&f, b"!", end).unwrap();
                    body.resize(end as usize, 0);
                    body.push(b'!');
                }
                model.parents(&rel);
                model.files.insert(rel, body);
            }
            4 if !existing.is_empty() => {
                let rel = rng.pick(&existing).clone();
                // Not a file linked in this job (the model does not follow shared inodes), nor
                // a symlink.
                let md = std::fs::symlink_metadata(v.join(&rel)).unwrap();
                let linked = std::os::unix::fs::MetadataExt::nlink(&md) > 1;
                if rel.starts_with("links") || linked || md.is_symlink() {
                    continue;
                }
                let tail = format!("+{}", rng.next());
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(v.join(&rel))
                    .unwrap()
                    .write_all(tail.as_bytes())
                    .unwrap();
                model.files.get_mut(&rel).unwrap().extend(tail.as_bytes());
            }
            5 if !existing.is_empty() => {
                let rel = rng.pick(&existing).clone();
                std::fs::remove_file(v.join(&rel)).unwrap();
                model.files.remove(&rel);
            }
            6 => {
                let d = std::path::Path::new(rng.pick(&dirs[1..])).to_path_buf();
                if model.dirs.contains(&d) {
                    std::fs::remove_dir_all(v.join(&d)).unwrap();
                    model.files.retain(|p, _| !p.starts_with(&d));
                    model.dirs.retain(|p| !p.starts_with(&d));
                }
            }
            7 => {
                // A rename of a top directory (volumes have no redirect_dir: copied up whole).
                let (from, to) = (rng.pick(&["d0", "d1", "d2"]), format!("r{}", rng.below(3)));
                let (from, to) = (std::path::Path::new(from), std::path::Path::new(&to));
                if model.dirs.contains(from)
                    && !model.dirs.contains(to)
                    && !model.files.contains_key(to)
                {
                    // overlayfs refuses to rename a lower directory without redirect_dir
                    // (EXDEV); mv then copies it, as build tools do.
                    sh(&format!(
                        "mv {} {}",
                        v.join(from).display(),
                        v.join(to).display()
                    ));
                    let moved = |p: &std::path::Path| to.join(p.strip_prefix(from).unwrap());
                    model.files = std::mem::take(&mut model.files)
                        .into_iter()
                        .map(|(p, b)| {
                            if p.starts_with(from) {
                                (moved(&p), b)
                            } else {
                                (p, b)
                            }
                        })
                        .collect();
                    model.dirs = std::mem::take(&mut model.dirs)
                        .into_iter()
                        .map(|p| if p.starts_with(from) { moved(&p) } else { p })
                        .collect();
                }
            }
            8 if !existing.is_empty() => {
                // Hardlinks live in `links/` and are never written again (a copy-up would split
                // them, which the model does not follow).
                let src = rng.pick(&existing).clone();
                let rel = std::path::Path::new("links").join(format!("l{}", rng.next() % 1000));
                if src.starts_with("links") || model.files.contains_key(&rel) {
                    continue;
                }
                std::fs::create_dir_all(v.join("links")).unwrap();
                std::fs::hard_link(v.join(&src), v.join(&rel)).unwrap();
                model.dirs.insert("links".into());
                let body = model.files[&src].clone();
                model.files.insert(rel, body);
            }
            9 if !model.dirs.contains(std::path::Path::new("big")) => {
                // Hundreds of entries with names of every length: a directory of many EROFS
                // blocks, looked up by bisection across them.
                std::fs::create_dir(v.join("big")).unwrap();
                model.dirs.insert("big".into());
                // A symlink too long to sit inline after its inode (a data block of its own).
                let target = "ab/".repeat(1350);
                std::os::unix::fs::symlink(&target, v.join("big/long-link")).unwrap();
                model
                    .files
                    .insert("big/long-link".into(), target.into_bytes());
                for i in 0..700 {
                    let name = format!("{i:03}-{}", "x".repeat(i % 240));
                    std::fs::write(v.join("big").join(&name), name.as_bytes()).unwrap();
                    model
                        .files
                        .insert(std::path::Path::new("big").join(&name), name.into_bytes());
                }
            }
            _ => {}
        }
    }
}

/// Random sequences of commits, metadata squashes and full squashes against a model: after each
/// step a volume shows exactly the model's files and directories, and a squash changes nothing
/// a snapshot sees (owners, modes, times, xattrs, sparse maps, hardlinks). Metadata bases made
/// from a walk of the merged view.
#[test]
fn real_random_commits_and_squashes_match_a_model() {
    if !root_or_skip("real_random_commits_and_squashes_match_a_model") {
        return;
    }
    campaign(false);
}

/// [`real_random_commits_and_squashes_match_a_model`] under `squash_method = "metadata"`:
/// commits write their layer's manifest, and a metadata squash whose layers all have one
/// merges them (files::manifest) without reading the layers: the kernel's merged view of the
/// stack before it is the oracle.
#[test]
fn real_random_commits_and_squashes_from_manifests_match_a_model() {
    if !root_or_skip("real_random_commits_and_squashes_from_manifests_match_a_model") {
        return;
    }
    campaign(true);
}

fn campaign(manifests: bool) {
    let seed = std::env::var("JOBCACHEFS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6a6f_6263_6163_6865u64);
    eprintln!("seed {seed} (JOBCACHEFS_TEST_SEED replays it)");
    let mut rng = Rng(seed | 1);
    let n = Node::with_config(if manifests {
        "keep_generations = 1\nmax_depth = 64\nsquash_method = \"metadata\"\n"
    } else {
        "keep_generations = 1\nmax_depth = 64\n"
    });
    let mut from_manifests = 0;
    let mut model = Model::default();
    // Two commits, then a squash: a metadata one two times in three (over layers, over an
    // earlier metadata base and the layers committed on it), else a full one.
    for step in 0..18 {
        let op = match (step % 3, rng.below(3)) {
            (2, 0) => 3,
            (2, _) => 2,
            _ => 0,
        };
        let what = match op {
            0 | 1 => {
                let v = n.create(
                    &format!("j{step}"),
                    "r",
                    &["--size", "256Mi", "--write-back"],
                );
                random_job(&mut rng, &v, &mut model);
                n.delete(&v, &[]).ok();
                "commit"
            }
            kind => {
                let (flag, what) = if kind == 2 {
                    ("--metadata", "metadata squash")
                } else {
                    ("--full", "full squash")
                };
                let v = n.create(&format!("s{step}"), "r", &[]);
                let want = snap(&v);
                n.delete(&v, &[]).ok();
                // Whether every layer the squash folds has a manifest.
                let all = n.show("r")["layers"].as_array().unwrap().iter().all(|l| {
                    let id = l["id"].as_str().unwrap();
                    n.state()
                        .join(format!("caches/default/r/layers/{id}.manifest"))
                        .exists()
                });
                let r = n.run(&["cache", "squash", "r", flag]).ok();
                if kind == 2 {
                    let used = r.stderr.contains("\"from_manifests\":true");
                    assert_eq!(used, all && manifests, "step {step}: {}", r.stderr);
                    from_manifests += used as usize;
                }
                let v = n.create(&format!("q{step}"), "r", &[]);
                assert_same_tree(&want, &v, &format!("step {step}: after a {what}"));
                n.delete(&v, &[]).ok();
                assert_eq!(
                    base_format(&n, "r") == Format::Mapped,
                    kind == 2,
                    "step {step}: the base's format"
                );
                what
            }
        };
        eprintln!(
            "step {step}: {what}, {} files, {} dirs",
            model.files.len(),
            model.dirs.len()
        );
        let v = n.create(&format!("c{step}"), "r", &[]);
        let seen = Model::read(&v);
        n.delete(&v, &[]).ok();
        if seen != model {
            let missing: Vec<_> = model
                .files
                .keys()
                .filter(|p| !seen.files.contains_key(*p))
                .collect();
            let extra: Vec<_> = seen
                .files
                .keys()
                .filter(|p| !model.files.contains_key(*p))
                .collect();
            let differ: Vec<_> = model
                .files
                .iter()
                .filter(|(p, b)| seen.files.get(*p).is_some_and(|s| s != *b))
                .map(|(p, _)| p)
                .collect();
            panic!(
                "seed {seed}, step {step} ({what}): the cache is not the model: missing {missing:?}, extra {extra:?}, different bytes {differ:?}, dirs equal {}",
                seen.dirs == model.dirs
            );
        }
    }
    eprintln!("{from_manifests} metadata squashes from manifests");
    // The fixed seed's sequence has squashes over layers that all have manifests (each step
    // above checked that such a squash used them).
    if manifests && std::env::var_os("JOBCACHEFS_TEST_SEED").is_none() {
        assert!(from_manifests > 0, "no metadata squash used the manifests");
    }
    n.assert_clean();
}

/// Every metadata squash keeps the bytes of files later layers replaced; once they pass the live
/// ones (and 64 MiB), a full squash is due and `squash_method = "metadata"` makes one, saying
/// why. The data layers count against the cache-size meanwhile.
#[test]
fn real_shadowed_data_makes_the_next_squash_full() {
    if !root_or_skip("real_shadowed_data_makes_the_next_squash_full") {
        return;
    }
    let n = Node::with_config("squash_method = \"metadata\"\nkeep_generations = 1\n");
    let write = |name: &str, seed: &str| {
        let v = n.create(name, "c", &["--size", "256Mi", "--write-back"]);
        sh(&format!(
            "cd {}; yes {seed} | head -c 70000000 > big; echo {seed} > small",
            v.display()
        ));
        n.delete(&v, &[]).ok();
    };
    for seed in ["a", "b", "c"] {
        write(seed, seed);
    }
    n.run(&["cache", "squash", "c"]).ok();
    assert_eq!(
        show_layers(&n, "c"),
        (1, 3),
        "a metadata base over 3 layers"
    );
    let usage = n.show("c")["layers"][0]["data_usage"].clone();
    assert!(
        usage["allocated"].as_u64().unwrap() > 190 << 20
            && usage["live"].as_u64().unwrap() < 75 << 20,
        "{usage}"
    );
    assert_eq!(n.show("c")["squash_due"], true, "more shadowed than live");
    let shown = n.run(&["cache", "show", "c"]).ok().stdout;
    assert!(
        shown.contains("Data layers: 3 below the metadata base")
            && shown.contains("the next squash is a full one"),
        "{shown}"
    );
    // The cache's size counts the data layers under the base.
    assert!(n.show("c")["allocated"].as_u64().unwrap() > 190 << 20);
    let r = n.run(&["cache", "squash", "c"]).ok();
    assert!(
        r.stderr.contains("full squash instead") && r.stderr.contains("replaced or deleted"),
        "{}",
        r.stderr
    );
    assert_eq!(
        show_layers(&n, "c"),
        (1, 0),
        "a full squash: no data layers"
    );
    assert!(n.show("c")["allocated"].as_u64().unwrap() < 75 << 20);
    let v = n.create("check", "c", &[]);
    assert_eq!(std::fs::read_to_string(v.join("small")).unwrap(), "c\n");
    assert_eq!(std::fs::metadata(v.join("big")).unwrap().len(), 70_000_000);
    n.delete(&v, &[]).ok();
    n.assert_clean();
}

/// A POSIX ACL as `system.posix_acl_access` carries it: version 2, then (tag, perm, id) entries
/// in tag order: owner rw-, user 1000 r--, group r--, mask r--, other ---.
fn acl_value() -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, UNDEFINED),
        (0x02, 4, 1000),
        (0x04, 4, UNDEFINED),
        (0x10, 4, UNDEFINED),
        (0x20, 0, UNDEFINED),
    ] {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

/// What a metadata base must keep as it is, beyond the rich tree: a 3,900-byte xattr (its
/// inode then passes one EROFS block), a POSIX ACL, and an overlayfs xattr of the job's own
/// (stored escaped in the layers, shown unescaped in the view) — on a stub and on a directory.
#[test]
fn real_a_metadata_base_keeps_big_xattrs_acls_and_the_jobs_overlay_xattrs() {
    if !root_or_skip("real_a_metadata_base_keeps_big_xattrs_acls_and_the_jobs_overlay_xattrs") {
        return;
    }
    let n = Node::with_config("keep_generations = 1\n");
    let v = n.create("l1", "c", &["--size", "256Mi", "--write-back"]);
    std::fs::create_dir(v.join("dir")).unwrap();
    for p in ["attrs", "dir/f"] {
        std::fs::write(v.join(p), b"data").unwrap();
        xattr::set(v.join(p), "user.big", &[b'v'; 3900]).unwrap();
        xattr::set(v.join(p), "system.posix_acl_access", &acl_value()).unwrap();
    }
    xattr::set(v.join("attrs"), "trusted.overlay.job", b"mine").unwrap();
    xattr::set(v.join("dir"), "trusted.overlay.opaque", b"y").unwrap();
    n.delete(&v, &[]).ok();
    let v = n.create("l2", "c", &["--size", "256Mi", "--write-back"]);
    std::fs::write(v.join("dir/g"), b"g").unwrap();
    let want = snap(&v);
    let own = |v: &std::path::Path| {
        (
            xattr::get(v.join("attrs"), "trusted.overlay.job").unwrap(),
            xattr::get(v.join("dir"), "trusted.overlay.opaque").unwrap(),
        )
    };
    let before = own(&v);
    assert_eq!(
        before.0.as_deref(),
        Some(&b"mine"[..]),
        "the job's own xattr"
    );
    n.delete(&v, &[]).ok();
    n.run(&["cache", "squash", "c", "--metadata"]).ok();
    assert_eq!(base_format(&n, "c"), Format::Mapped);
    let v = n.create("check", "c", &[]);
    assert_same_tree(&want, &v, "through the metadata base");
    assert_eq!(
        own(&v),
        before,
        "the job's overlay xattrs, as the stack showed them"
    );
    assert_eq!(
        xattr::get(v.join("dir/f"), "system.posix_acl_access").unwrap(),
        Some(acl_value())
    );
    assert_eq!(std::fs::read(v.join("dir/f")).unwrap(), b"data");
    n.delete(&v, &[]).ok();
    n.assert_clean();
}

/// Under `squash_method = "metadata"` a commit past `metadata_squash_depth` is followed by a
/// metadata squash (inline here), not only past `max_depth`; where none is possible (no
/// data-only layers), the cache waits for `max_depth` as before.
#[test]
fn real_metadata_squashes_come_at_their_own_depth() {
    if !root_or_skip("real_metadata_squashes_come_at_their_own_depth") {
        return;
    }
    let n = Node::with_config("squash_method = \"metadata\"\nmetadata_squash_depth = 2\n");
    let commit = |cache: &str, i: usize, env: &[(&str, &str)]| {
        let v = n.create(&format!("{cache}{i}"), cache, &["--write-back"]);
        std::fs::write(v.join(format!("f{i}")), "x").unwrap();
        n.run_env(&["volume", "delete", v.to_str().unwrap()], env)
            .ok();
    };
    for i in 0..3 {
        commit("c", i, &[]);
    }
    assert_eq!(show_layers(&n, "c"), (1, 3), "a metadata base over the 3");
    assert_eq!(base_format(&n, "c"), Format::Mapped);
    let off = [
        ("JOBCACHEFS_NO_DATA_LAYERS", "1"),
        ("JOBCACHEFS_NO_EROFS_MAPPED", "1"),
    ];
    for i in 0..3 {
        commit("d", i, &off);
    }
    assert_eq!(
        show_layers(&n, "d"),
        (3, 0),
        "no metadata squash possible: max_depth rules"
    );
    n.assert_clean();
}

/// A layer's manifest describes its own image or is not used: one of another image (what a
/// volume whose commit was squashed or refused could once leave for the next volume at its DIR
/// to publish) would map files to blocks of the wrong image. The squash then walks the view.
#[test]
fn real_a_manifest_of_another_image_is_not_used() {
    if !root_or_skip("real_a_manifest_of_another_image_is_not_used") {
        return;
    }
    let n = Node::with_config("squash_method = \"metadata\"\nmetadata_squash_depth = 8\n");
    let want = three_layers(&n, "c");
    let ids: Vec<String> = n.show("c")["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    let layers = n.state().join("caches/default/c/layers");
    let manifest = |id: &str| layers.join(format!("{id}.manifest"));
    assert!(ids.iter().all(|id| manifest(id).exists()), "{ids:?}");
    // The middle layer's manifest replaced by the top one's.
    std::fs::copy(manifest(&ids[2]), manifest(&ids[1])).unwrap();
    let r = n.run(&["cache", "squash", "c", "--metadata"]).ok();
    assert!(
        r.stderr.contains("a layer manifest of another image"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("\"from_manifests\":false"),
        "{}",
        r.stderr
    );
    let v = n.create("v", "c", &[]);
    assert_same_tree(&want, &v, "after a squash that refused a foreign manifest");
    n.delete(&v, &[]).ok();
    n.assert_clean();
}
