//! Clone-mode caches for real, as root: FICLONE clones in the reflink pool (the test state dirs
//! are on the host's ext4, which cannot clone), real buildah with the kernel overlay driver
//! inside a clone volume, the write lease, fidelity of what container storage writes (whiteout
//! devices, overlay xattrs), ENOSPC at the clone's size, and a SIGKILL in the commit.

mod common;

use common::{root_or_skip, sh, snap, Node};
use std::path::Path;
use std::process::Command;

/// A small pool: the tests' caches are 512 Mi.
const CONFIG: &str = "clone_pool_size = \"4Gi\"\n";
const CLONE: &[&str] = &[
    "--cache-mode",
    "clone",
    "--cache-size",
    "512Mi",
    "--write-back",
];

fn buildah(storage_conf: &Path, args: &[&str]) -> std::process::Output {
    Command::new("buildah")
        .env("CONTAINERS_STORAGE_CONF", storage_conf)
        .args(args)
        .output()
        .expect("buildah runs (scripts/setup installs it)")
}

/// A storage.conf keeping container storage in `graphroot` with the kernel overlay driver (no
/// mount_program, no fuse-overlayfs).
fn storage_conf(node: &Node, name: &str, graphroot: &Path) -> std::path::PathBuf {
    let run = node.tmp.path().join(format!("run-{name}"));
    std::fs::create_dir_all(&run).unwrap();
    let p = node.tmp.path().join(format!("storage-{name}.conf"));
    std::fs::write(
        &p,
        format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            graphroot.display(),
            run.display()
        ),
    )
    .unwrap();
    p
}

fn build(node: &Node, conf: &Path) -> std::process::Output {
    let ctx = node.tmp.path().join("ctx");
    if !ctx.exists() {
        std::fs::create_dir(&ctx).unwrap();
        std::fs::write(
            ctx.join("Containerfile"),
            "FROM scratch\nCOPY deps /deps\nCOPY app /app\n",
        )
        .unwrap();
        sh(&format!(
            "cd {}; mkdir deps; head -c 2000000 /dev/urandom > deps/big.jar; echo main > app",
            ctx.display()
        ));
    }
    buildah(
        conf,
        &[
            "build",
            "--layers",
            "--storage-driver",
            "overlay",
            "-f",
            ctx.join("Containerfile").to_str().unwrap(),
            "-t",
            "localhost/jcfs-test:1",
            ctx.to_str().unwrap(),
        ],
    )
}

#[test]
fn real_clone_buildah_builds_in_a_clone_volume_and_the_next_job_reuses_its_layers() {
    if !root_or_skip(
        "real_clone_buildah_builds_in_a_clone_volume_and_the_next_job_reuses_its_layers",
    ) {
        return;
    }
    let node = Node::with_config(CONFIG);
    let a = node.create("a", "images", CLONE);
    let conf_a = storage_conf(&node, "a", &a.join("storage"));
    let out = build(&node, &conf_a);
    assert!(
        out.status.success(),
        "buildah build in a clone volume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = buildah(&conf_a, &["info", "--format", "{{.store.GraphDriverName}}"]);
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), "overlay");
    let d = node.delete(&a, &["-o", "json"]).ok().json();
    assert_eq!(d["outcome"], "committed", "{d}");

    let b = node.create("b", "images", CLONE);
    let conf_b = storage_conf(&node, "b", &b.join("storage"));
    let images = buildah(&conf_b, &["images", "--format", "{{.Name}}:{{.Tag}}"]);
    assert!(
        String::from_utf8_lossy(&images.stdout).contains("localhost/jcfs-test:1"),
        "the next job sees the image: {}",
        String::from_utf8_lossy(&images.stdout)
    );
    let from = buildah(&conf_b, &["from", "localhost/jcfs-test:1"]);
    assert!(
        from.status.success(),
        "{}",
        String::from_utf8_lossy(&from.stderr)
    );
    let ctr = String::from_utf8_lossy(&from.stdout).trim().to_string();
    let mnt = buildah(&conf_b, &["mount", &ctr]);
    assert!(
        mnt.status.success(),
        "{}",
        String::from_utf8_lossy(&mnt.stderr)
    );
    let merged = std::path::PathBuf::from(String::from_utf8_lossy(&mnt.stdout).trim());
    let ctx = node.tmp.path().join("ctx");
    assert_eq!(
        std::fs::read(merged.join("deps/big.jar")).unwrap(),
        std::fs::read(ctx.join("deps/big.jar")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(merged.join("app")).unwrap(),
        "main\n"
    );
    // The same steps again: every layer from the cache.
    let again = build(&node, &conf_b);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let text = String::from_utf8_lossy(&again.stdout);
    assert_eq!(
        text.matches("Using cache").count(),
        2,
        "both COPY steps reused: {text}"
    );
    // The container is still mounted under DIR: delete unmounts what the job left.
    let d = node.delete(&b, &["-o", "json"]).ok().json();
    assert_eq!(d["outcome"], "committed", "{d}");
    node.run(&["gc"]).ok();
    assert!(node.mounts().iter().all(|m| !m.starts_with(node.vol(""))));
}

#[test]
fn real_clone_overlay_mode_cannot_hold_container_storage() {
    if !root_or_skip("real_clone_overlay_mode_cannot_hold_container_storage") {
        return;
    }
    let node = Node::with_config(CONFIG);
    let v = node.create("o", "layers", &["--write-back"]);
    let conf = storage_conf(&node, "o", &v.join("storage"));
    let out = build(&node, &conf);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not supported over overlayfs"),
        "the driver's own message: {err}"
    );
    node.delete(&v, &["--discard"]).ok();
}

#[test]
fn real_clone_one_writer_holds_the_lease_the_other_says_why_it_did_not_commit() {
    if !root_or_skip("real_clone_one_writer_holds_the_lease_the_other_says_why_it_did_not_commit") {
        return;
    }
    let node = Node::with_config(CONFIG);
    let a = node.create("a", "c", CLONE);
    let b_dir = node.vol("b");
    let r = node.run(&[
        "volume",
        "create",
        b_dir.to_str().unwrap(),
        "--cache",
        "c",
        "--cache-mode",
        "clone",
        "--write-back",
    ]);
    let r = r.ok();
    assert!(
        r.stderr
            .contains("write lease of cache default/c is held by the volume at"),
        "{}",
        r.stderr
    );
    std::fs::write(a.join("f"), "a").unwrap();
    std::fs::write(b_dir.join("f"), "b").unwrap();
    let db = node.delete(&b_dir, &["-o", "json"]).ok().json();
    assert_eq!(db["outcome"], "discarded");
    assert!(
        db["reason"]
            .as_str()
            .unwrap()
            .contains("runs as a discard volume"),
        "{db}"
    );
    let da = node.delete(&a, &["-o", "json"]).ok().json();
    assert_eq!(da["outcome"], "committed");
    let c = node.create("c2", "c", &[]);
    assert_eq!(std::fs::read_to_string(c.join("f")).unwrap(), "a");
    let show = node.show("c");
    assert_eq!(show["mode"], "clone");
    node.delete(&c, &[]).ok();
    node.assert_clean_volumes();
}

#[test]
fn real_clone_keeps_what_container_storage_writes_exactly() {
    if !root_or_skip("real_clone_keeps_what_container_storage_writes_exactly") {
        return;
    }
    let node = Node::with_config(CONFIG);
    let a = node.create("a", "c", CLONE);
    common::rich_tree(&a, true);
    sh(&format!(
        "cd {}; mkdir -p l/diff/gone; mknod l/diff/wh c 0 0; setfattr -n trusted.overlay.opaque -v y l/diff/gone",
        a.display()
    ));
    let before = snap(&a);
    assert_eq!(
        node.delete(&a, &["-o", "json"]).ok().json()["outcome"],
        "committed"
    );
    let b = node.create("b", "c", &[]);
    let d = jobcachefs::files::tree::diff(&before, &snap(&b));
    assert!(
        d.is_empty(),
        "clone commit changed the tree:\n{}",
        d.join("\n")
    );
    let xa = xattr::get(b.join("l/diff/gone"), "trusted.overlay.opaque").unwrap();
    assert_eq!(
        xa.as_deref(),
        Some(&b"y"[..]),
        "overlay xattrs are plain data here"
    );
    node.delete(&b, &[]).ok();
}

#[test]
fn real_clone_a_full_clone_gets_enospc_never_an_io_error() {
    if !root_or_skip("real_clone_a_full_clone_gets_enospc_never_an_io_error") {
        return;
    }
    let node = Node::with_config(CONFIG);
    let a = node.create(
        "a",
        "small",
        &["--cache-mode", "clone", "--cache-size", "64Mi"],
    );
    let out = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", a.join("fill").display()),
            "bs=1M",
            "count=200",
            "conv=fsync",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("Input/output error"), "{err}");
    node.delete(&a, &[]).ok();
}

#[test]
fn real_clone_sigkill_in_commit_leaves_old_or_new_and_gc_repairs() {
    if !root_or_skip("real_clone_sigkill_in_commit_leaves_old_or_new_and_gc_repairs") {
        return;
    }
    for step in [
        "clone-delete:unmounted",
        "clone-commit:renamed",
        "clone-commit:published",
    ] {
        let node = Node::with_config(CONFIG);
        let a = node.create("a", "c", CLONE);
        std::fs::write(a.join("f"), step).unwrap();
        let r = node.run_env(
            &["volume", "delete", a.to_str().unwrap()],
            &[("JOBCACHEFS_CRASH_AT", step)],
        );
        assert_ne!(r.code, 0, "{step}: killed");
        let g = node.generation("c");
        assert!(g == 0 || g == 1, "{step}: old or new, got {g}");
        node.run(&["gc"]).ok();
        assert_eq!(node.generation("c"), 1, "{step}: gc finished the commit");
        let b = node.create("b", "c", &[]);
        assert_eq!(std::fs::read_to_string(b.join("f")).unwrap(), step);
        node.delete(&b, &[]).ok();
        node.assert_clean_volumes();
    }
}

#[test]
fn real_clone_volume_can_be_idmapped_an_overlay_volume_cannot() {
    if !root_or_skip("real_clone_volume_can_be_idmapped_an_overlay_volume_cannot") {
        return;
    }
    use jobcachefs::host::idmap::{idmap_mount, userns_fd};
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let node = Node::with_config(CONFIG);
    // What a pod with `hostUsers: false` gets: its user namespace maps 0..65536 to 100000...
    let userns = userns_fd("0 100000 65536", "0 100000 65536").unwrap();

    let c = node.create(
        "c",
        "ids",
        &["--cache-mode", "clone", "--cache-size", "512Mi"],
    );
    sh(&format!(
        "cd {}; echo r > root-owned; echo u > user-owned; chown 1000:2000 user-owned",
        c.display()
    ));
    let view = node.tmp.path().join("idmapped");
    std::fs::create_dir(&view).unwrap();
    idmap_mount(&c, &view, userns.as_fd()).unwrap();
    let owner = |p: &Path| {
        let md = std::fs::metadata(p).unwrap();
        (md.uid(), md.gid())
    };
    assert_eq!(owner(&view.join("root-owned")), (100000, 100000));
    assert_eq!(owner(&view.join("user-owned")), (101000, 102000));
    assert_eq!(
        owner(&c.join("user-owned")),
        (1000, 2000),
        "the volume itself is unchanged"
    );
    // The pod's root (host uid 100000) writes through the view; the file is root's on disk.
    let w = Command::new("setpriv")
        .args([
            "--reuid=100000",
            "--regid=100000",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!("echo w > {}", view.join("written").display()))
        .output()
        .unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert_eq!(owner(&c.join("written")), (0, 0));
    assert_eq!(owner(&view.join("written")), (100000, 100000));
    // A uid outside the map cannot create files there (EOVERFLOW), host root included.
    let e = std::fs::write(view.join("unmapped"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EOVERFLOW), "{e}");
    nix::mount::umount2(&view, nix::mount::MntFlags::empty()).unwrap();

    let o = node.create("o", "layers", &[]);
    let view2 = node.tmp.path().join("idmapped-overlay");
    std::fs::create_dir(&view2).unwrap();
    let e = idmap_mount(&o, &view2, userns.as_fd()).unwrap_err();
    assert_eq!(e.kind(), jobcachefs::error::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("EINVAL"), "{e}");
    assert!(node.mounts().iter().all(|m| m != &view2));
    node.delete(&o, &[]).ok();
    node.delete(&c, &[]).ok();
    node.assert_clean_volumes();
}

#[test]
fn real_clone_a_fragmented_image_is_rebuilt_exactly_and_a_killed_rebuild_changes_nothing() {
    if !root_or_skip(
        "real_clone_a_fragmented_image_is_rebuilt_exactly_and_a_killed_rebuild_changes_nothing",
    ) {
        return;
    }
    // Any committed image has more than one extent: every commit queues a rebuild.
    let node = Node::with_config(&format!("{CONFIG}clone_max_extents = 1\n"));
    let a = node.create("a", "c", CLONE);
    common::rich_tree(&a, true);
    sh(&format!(
        "cd {}; mkdir -p l/diff/gone; mknod l/diff/wh c 0 0; setfattr -n trusted.overlay.opaque -v y l/diff/gone; \
         for i in $(seq 1 200); do head -c 5000 /dev/urandom > l/f$i; done",
        a.display()
    ));
    let before = snap(&a);
    assert_eq!(
        node.delete(&a, &["-o", "json"]).ok().json()["outcome"],
        "committed"
    );
    assert!(
        node.state().join("queue/squash_default_c").exists(),
        "a rebuild is queued"
    );

    // Killed mid-copy: the generation stays, gc clears the half-built image.
    let r = node.run_env(
        &["cache", "squash", "c"],
        &[("JOBCACHEFS_CRASH_AT", "rebuild:copied")],
    );
    assert_eq!(r.code, 137, "{}", r.stderr);
    assert_eq!(node.generation("c"), 1);
    node.run(&["gc"]).ok();
    let leftovers: Vec<_> = std::fs::read_dir(node.state().join("mnt/pool/caches/default/c"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let r = node.run(&["gc", "--drain", "-o", "json"]).ok().json();
    assert_eq!(r["squashed"][0], "default/c", "{r}");
    assert_eq!(node.generation("c"), 2);
    let h = node
        .run(&["cache", "history", "c", "-n", "1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(h[0]["kind"], "rebuild");
    let b = node.create("b", "c", &[]);
    let d = jobcachefs::files::tree::diff(&before, &snap(&b));
    assert!(
        d.is_empty(),
        "the rebuild changed the tree:\n{}",
        d.join("\n")
    );
    let xa = xattr::get(b.join("l/diff/gone"), "trusted.overlay.opaque").unwrap();
    assert_eq!(
        xa.as_deref(),
        Some(&b"y"[..]),
        "overlay xattrs survive the rebuild as data"
    );
    node.delete(&b, &[]).ok();
    node.assert_clean_volumes();
}
