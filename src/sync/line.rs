//! The registry's layer line and a node's generation, merged (pure; no I/O).
//!
//! Both are ordered layer lists, bottom first. Each layer has a globally unique id (random at
//! commit) and, for a squashed base, the ids it folds (`covers`). A layer is *known* to a side if
//! its id is one of that side's layers or is covered by one. What a side has that the other lacks
//! is its layers that are not known there — except a base whose every covered id is known there:
//! it folds nothing new.
//!
//! Push: nothing new locally → nothing to do; otherwise the local news are stacked on the remote
//! line (a rebase: per path, the later layer — the local one — wins, as on one node), or, when
//! the remote line has nothing the node lacks and the local line is shallower (a squash), the
//! local line replaces the remote one.
//! Pull is the mirror image: the remote line with the local news stacked on top.

use std::collections::HashSet;

/// A layer as the merge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineLayer {
    /// Unique id.
    pub id: String,
    /// Ids a squashed base folds (empty for a delta).
    pub covers: Vec<String>,
}

/// Where a layer of a merged line comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// The remote line's layer at this index.
    Remote(usize),
    /// The local generation's layer at this index.
    Local(usize),
}

fn known(layers: &[LineLayer]) -> HashSet<&str> {
    layers
        .iter()
        .flat_map(|l| std::iter::once(l.id.as_str()).chain(l.covers.iter().map(String::as_str)))
        .collect()
}

/// Indexes of `mine` that `theirs` does not know.
fn news(mine: &[LineLayer], theirs: &[LineLayer]) -> Vec<usize> {
    let k = known(theirs);
    mine.iter()
        .enumerate()
        .filter(|(_, l)| {
            // Unknown, and not a base that folds only known layers.
            let folds_known =
                !l.covers.is_empty() && l.covers.iter().all(|c| k.contains(c.as_str()));
            !k.contains(l.id.as_str()) && !folds_known
        })
        .map(|(i, _)| i)
        .collect()
}

/// What to push: `None` when the registry needs nothing from this node. `max_depth` bounds the
/// remote line: a local squash that folds a too-deep remote line is pushed as its new base.
pub(crate) fn plan_push(
    remote: &[LineLayer],
    local: &[LineLayer],
    max_depth: usize,
) -> Option<Vec<Src>> {
    let ours = news(local, remote);
    let theirs = news(remote, local);
    let all_local = || (0..local.len()).map(Src::Local).collect();
    match (ours.is_empty(), theirs.is_empty()) {
        (true, true) if remote.len() > max_depth && local.len() < remote.len() => Some(all_local()),
        (true, _) => None,
        // The remote line has nothing we lack: our line, or the remote one with our news on top,
        // whichever is shallower (on a tie the remote's layers are kept: nothing to re-upload).
        (false, true) if local.len() < remote.len() + ours.len() => Some(all_local()),
        (false, _) => Some(
            (0..remote.len())
                .map(Src::Remote)
                .chain(ours.into_iter().map(Src::Local))
                .collect(),
        ),
    }
}

/// Whether the remote line has layers the local generation does not know (a push then re-bases).
pub(crate) fn remote_has_news(remote: &[LineLayer], local: &[LineLayer]) -> bool {
    !news(remote, local).is_empty()
}

/// What the local generation becomes after a pull: `None` when the remote line has nothing new.
pub(crate) fn plan_pull(remote: &[LineLayer], local: &[LineLayer]) -> Option<Vec<Src>> {
    if news(remote, local).is_empty() {
        return None;
    }
    Some(
        (0..remote.len())
            .map(Src::Remote)
            .chain(news(local, remote).into_iter().map(Src::Local))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use Src::*;

    fn d(id: &str) -> LineLayer {
        LineLayer {
            id: id.into(),
            covers: vec![],
        }
    }
    fn s(id: &str, covers: &[&str]) -> LineLayer {
        LineLayer {
            id: id.into(),
            covers: covers.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn first_push_and_fast_forward() {
        assert_eq!(plan_push(&[], &[d("a")], 8), Some(vec![Local(0)]));
        assert_eq!(
            plan_push(&[d("a")], &[d("a"), d("b")], 8),
            Some(vec![Remote(0), Local(1)])
        );
        assert_eq!(plan_push(&[d("a"), d("b")], &[d("a"), d("b")], 8), None);
        assert_eq!(
            plan_push(&[d("a"), d("b")], &[d("a")], 8),
            None,
            "behind: pull"
        );
    }

    #[test]
    fn diverged_push_rebases_local_news_on_the_remote_line() {
        let remote = [d("a"), d("b")];
        let local = [d("a"), d("c")];
        assert_eq!(
            plan_push(&remote, &local, 8),
            Some(vec![Remote(0), Remote(1), Local(1)])
        );
        assert_eq!(
            plan_pull(&remote, &local),
            Some(vec![Remote(0), Remote(1), Local(1)])
        );
    }

    #[test]
    fn both_orders_converge() {
        // A pushes first, B rebases on it, then both pull: the same line everywhere.
        let a = vec![d("base"), d("fa")];
        let b = vec![d("base"), d("fb")];
        let r1 = a.clone(); // A's push
        let pb = plan_push(&r1, &b, 8).unwrap();
        let pick = |plan: &[Src], r: &[LineLayer], l: &[LineLayer]| -> Vec<LineLayer> {
            plan.iter()
                .map(|f| match f {
                    Remote(i) => r[*i].clone(),
                    Local(i) => l[*i].clone(),
                })
                .collect()
        };
        let r2 = pick(&pb, &r1, &b);
        let a2 = pick(&plan_pull(&r2, &a).unwrap(), &r2, &a);
        let b2 = match plan_pull(&r2, &b) {
            Some(p) => pick(&p, &r2, &b),
            None => b.clone(),
        };
        assert_eq!(a2, r2);
        assert_eq!(
            b2, r2,
            "B's pull after its own push must give the same line"
        );
        assert_eq!(plan_push(&r2, &a2, 8), None);
    }

    #[test]
    fn squashed_bases() {
        // A local squash of layers the registry has is nothing new…
        let remote = [d("a"), d("b"), d("c")];
        let local = [s("S", &["a", "b", "c"])];
        assert_eq!(plan_push(&remote, &local, 8), None);
        assert_eq!(plan_pull(&remote, &local), None);
        // …unless the remote line is too deep: then it is pushed as the new base.
        assert_eq!(plan_push(&remote, &local, 2), Some(vec![Local(0)]));
        // A squash that folds an unpushed delta is new.
        let local = [s("S", &["a", "b", "c", "x"])];
        assert_eq!(plan_push(&remote, &local, 8), Some(vec![Local(0)]));
        // A remote squash covering what we have, plus our unpushed delta on top.
        let remote = [s("R", &["a", "b"])];
        let local = [d("a"), d("b"), d("mine")];
        assert_eq!(
            plan_push(&remote, &local, 8),
            Some(vec![Remote(0), Local(2)])
        );
        assert_eq!(
            plan_pull(&remote, &local),
            None,
            "R folds nothing new for us"
        );
    }
}
