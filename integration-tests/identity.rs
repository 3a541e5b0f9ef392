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
