//! Per-volume identities for real, as root: `setpriv` switches to a volume's UID and its cache's
//! GID as the README's Job does, and the kernel decides what that user may read.

mod common;

use common::{root_or_skip, Node};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// Runs `sh -c script` in `volume` as the identity that owns its root.
fn as_owner_of(volume: &Path, script: &str) -> std::process::Output {
    let md = std::fs::metadata(volume).unwrap();
    Command::new("setpriv")
        .args([
            &format!("--reuid={}", md.uid()),
            &format!("--regid={}", md.gid()),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .current_dir(volume)
        .output()
        .unwrap()
}

#[test]
fn real_identity_a_volume_is_its_own_and_reaches_no_other() {
    if !root_or_skip("real_identity_a_volume_is_its_own_and_reaches_no_other") {
        return;
    }
    let node = Node::new();
    let ids = ["--unique-ids", "--write-back"];
    let a = node.create("a", "maven", &ids);
    let b = node.create("b", "maven", &ids);
    let c = node.create("c", "npm", &ids);
    let (ma, mb, mc) = (
        std::fs::metadata(&a).unwrap(),
        std::fs::metadata(&b).unwrap(),
        std::fs::metadata(&c).unwrap(),
    );
    assert_ne!(ma.uid(), mb.uid(), "two live volumes: two UIDs");
    assert_eq!(ma.gid(), mb.gid(), "one cache: one GID");
    assert_ne!(ma.gid(), mc.gid(), "two caches: two GIDs");
    for v in [&a, &b, &c] {
        let out = as_owner_of(
            v,
            "umask 022; mkdir -p m2/x && echo mine > m2/x/dep.jar && cat m2/x/dep.jar",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // As A: nothing of B (same cache, new files), of C (other cache) or of the state dir.
    for other in [b.join("m2/x/dep.jar"), c.join("m2/x/dep.jar")] {
        let out = as_owner_of(&a, &format!("cat {}", other.display()));
        assert!(!out.status.success(), "A read {}", other.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    }
    let out = as_owner_of(&a, &format!("ls {}", node.state().join("caches").display()));
    assert!(!out.status.success(), "A listed the state dir");
    let mode = std::fs::metadata(node.state()).unwrap().mode();
    assert_eq!(mode & 0o077, 0, "the state dir is root's alone: {mode:o}");
    // The commit keeps the job's files with their owner and group.
    assert_eq!(
        node.delete(&a, &["-o", "json"]).ok().json()["outcome"],
        "committed"
    );
    let d = node.create("d", "maven", &["--unique-ids"]);
    let md = std::fs::metadata(d.join("m2/x/dep.jar")).unwrap();
    assert_eq!(md.gid(), ma.gid(), "the cache's files carry its GID");
    let out = as_owner_of(&d, "cat m2/x/dep.jar");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "mine\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v in [&b, &c, &d] {
        node.delete(v, &["--discard"]).ok();
    }
    node.assert_clean();
}

#[test]
fn real_identity_each_job_owns_the_whole_cache_through_idmapped_mounts() {
    if !root_or_skip("real_identity_each_job_owns_the_whole_cache_through_idmapped_mounts") {
        return;
    }
    let node = Node::new();
    for (cache, mode) in [("layers", "overlay"), ("containers", "clone")] {
        let args = [
            "--unique-ids",
            "--write-back",
            "--cache-mode",
            mode,
            "--cache-size",
            "256Mi",
        ];
        let a = node.create(&format!("{mode}-a"), cache, &args);
        let out = as_owner_of(
            &a,
            "umask 022; mkdir -p m2/x m2/gone && echo v1 > m2/x/dep.jar && echo old > m2/gone/f && id -u",
        );
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let uid_a = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(
            node.delete(&a, &["-o", "json"]).ok().json()["outcome"],
            "committed",
            "{mode}"
        );

        // A later job with another UID (A's is free again: a live filler takes it) modifies,
        // adds to and deletes what the first wrote (directories made 0755 by umask 022: only
        // their owner may write them).
        let filler = node.create(&format!("{mode}-filler"), "other", &["--unique-ids"]);
        let b = node.create(&format!("{mode}-b"), cache, &args);
        let out = as_owner_of(
            &b,
            "set -e; test \"$(stat -c %u m2/x/dep.jar)\" = \"$(id -u)\"; \
             echo v2 > m2/x/dep.jar; echo new > m2/x/added.jar; rm -r m2/gone; id -u",
        );
        assert!(
            out.status.success(),
            "{mode}: job B could not own A's files: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(
            String::from_utf8_lossy(&out.stdout).trim(),
            uid_a,
            "{mode}: two different UIDs"
        );
        assert_eq!(
            node.delete(&b, &["-o", "json"]).ok().json()["outcome"],
            "committed",
            "{mode}"
        );

        let c = node.create(
            &format!("{mode}-c"),
            cache,
            &["--unique-ids", "--cache-mode", mode],
        );
        let out = as_owner_of(
            &c,
            "cat m2/x/dep.jar m2/x/added.jar; test ! -e m2/gone && echo gone",
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "v2\nnew\ngone\n",
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        node.delete(&c, &[]).ok();
        node.delete(&filler, &[]).ok();
    }
    node.run(&["gc"]).ok();
    assert!(
        node.mounts().iter().all(|m| !m.starts_with(node.vol(""))),
        "{:?}",
        node.mounts()
    );
    assert!(!node
        .mounts()
        .iter()
        .any(|m| m.to_string_lossy().contains("/mnt/idmap/")));
}
