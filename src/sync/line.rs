//! The registry's layer line and a node's generation, merged (pure; no I/O).
//!
//! Both are ordered layer lists, bottom first. Each layer has a globally unique id (random at
//! commit) and, for a squashed base, the ids it folds (`covers`). A layer is *known* to a side if
//! its id is one of that side's layers or is covered by one. What a side has that the other lacks
//! is its layers that are not known there — except a base whose every covered id is known there:
//! it folds nothing new.
//!
//! Tombstones: the ids a rollback undid, on either side (the node's `Generation::undone`, the
//! line's manifest annotation). A layer that is tombstoned, or a base that folds a tombstoned
//! layer, is *dead*: the merge sees neither line with it. So a remote's undone layer is never
//! pulled back, a node that still holds a layer the remote undid drops it on pull, and a push
//! replaces a remote line that still holds a layer this node undid. The union of both sides'
//! tombstones travels on with the merged line.
//!
//! Push: nothing new locally and nothing dead remotely → nothing to do; otherwise the local news
//! are stacked on the remote line (a rebase: per path, the later layer — the local one — wins, as
//! on one node), or, when the remote line has nothing the node lacks and the local line is
//! shallower (a squash, a rollback), the local line replaces the remote one.
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

/// Whether `l` is dead: undone by a rollback, or a base that folds an undone layer (its content
/// holds what was undone).
fn dead(l: &LineLayer, undone: &HashSet<String>) -> bool {
    undone.contains(&l.id) || l.covers.iter().any(|c| undone.contains(c))
}

/// The live layers of `layers` and, for each, its index in `layers`.
fn alive(layers: &[LineLayer], undone: &HashSet<String>) -> (Vec<LineLayer>, Vec<usize>) {
    layers
        .iter()
        .enumerate()
        .filter(|(_, l)| !dead(l, undone))
        .map(|(i, l)| (l.clone(), i))
        .unzip()
}

/// What to push: `None` when the registry needs nothing from this node. `undone`: the
/// tombstones of both sides. `max_depth` bounds the remote line: a local squash that folds a
/// too-deep remote line is pushed as its new base.
pub(crate) fn plan_push(
    remote: &[LineLayer],
    local: &[LineLayer],
    undone: &HashSet<String>,
    max_depth: usize,
) -> Option<Vec<Src>> {
    let (r, ri) = alive(remote, undone);
    let (l, li) = alive(local, undone);
    // A layer of the remote line is dead: the line must change even with nothing new here.
    let remote_dead = r.len() < remote.len();
    let ours = news(&l, &r);
    let theirs = news(&r, &l);
    let all_local = || li.iter().map(|&i| Src::Local(i)).collect();
    let rebased = || {
        ri.iter()
            .map(|&i| Src::Remote(i))
            .chain(ours.iter().map(|&i| Src::Local(li[i])))
            .collect()
    };
    match (ours.is_empty(), theirs.is_empty()) {
        (true, true) if (remote_dead || r.len() > max_depth) && l.len() < r.len() => {
            Some(all_local())
        }
        // Behind (or even): a pull brings the rest; only a dead remote layer needs a push now.
        (true, _) if remote_dead => Some(rebased()),
        (true, _) => None,
        // The remote line has nothing we lack: our line, or the remote one with our news on top,
        // whichever is shallower (on a tie the remote's layers are kept: nothing to re-upload).
        (false, true) if l.len() < r.len() + ours.len() => Some(all_local()),
        (false, _) => Some(rebased()),
    }
}

/// Whether the remote line has live layers the local generation does not know (a push then
/// re-bases).
pub(crate) fn remote_has_news(
    remote: &[LineLayer],
    local: &[LineLayer],
    undone: &HashSet<String>,
) -> bool {
    let (r, _) = alive(remote, undone);
    let (l, _) = alive(local, undone);
    !news(&r, &l).is_empty()
}

/// What the local generation becomes after a pull: `None` when the remote line has nothing new
/// and the local generation holds nothing dead. `undone`: the tombstones of both sides.
pub(crate) fn plan_pull(
    remote: &[LineLayer],
    local: &[LineLayer],
    undone: &HashSet<String>,
) -> Option<Vec<Src>> {
    let (r, ri) = alive(remote, undone);
    let (l, li) = alive(local, undone);
    let local_dead = l.len() < local.len();
    if news(&r, &l).is_empty() && !local_dead {
        return None;
    }
    Some(
        ri.iter()
            .map(|&i| Src::Remote(i))
            .chain(news(&l, &r).into_iter().map(|i| Src::Local(li[i])))
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
    fn none() -> HashSet<String> {
        HashSet::new()
    }
    fn undone(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|i| i.to_string()).collect()
    }
    /// The line a plan makes.
    fn pick(plan: &[Src], r: &[LineLayer], l: &[LineLayer]) -> Vec<LineLayer> {
        plan.iter()
            .map(|f| match f {
                Remote(i) => r[*i].clone(),
                Local(i) => l[*i].clone(),
            })
            .collect()
    }
    fn s(id: &str, covers: &[&str]) -> LineLayer {
        LineLayer {
            id: id.into(),
            covers: covers.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn first_push_and_fast_forward() {
        assert_eq!(plan_push(&[], &[d("a")], &none(), 8), Some(vec![Local(0)]));
        assert_eq!(
            plan_push(&[d("a")], &[d("a"), d("b")], &none(), 8),
            Some(vec![Remote(0), Local(1)])
        );
        assert_eq!(
            plan_push(&[d("a"), d("b")], &[d("a"), d("b")], &none(), 8),
            None
        );
        assert_eq!(
            plan_push(&[d("a"), d("b")], &[d("a")], &none(), 8),
            None,
            "behind: pull"
        );
    }

    #[test]
    fn diverged_push_rebases_local_news_on_the_remote_line() {
        let remote = [d("a"), d("b")];
        let local = [d("a"), d("c")];
        assert_eq!(
            plan_push(&remote, &local, &none(), 8),
            Some(vec![Remote(0), Remote(1), Local(1)])
        );
        assert_eq!(
            plan_pull(&remote, &local, &none()),
            Some(vec![Remote(0), Remote(1), Local(1)])
        );
    }

    #[test]
    fn both_orders_converge() {
        // A pushes first, B rebases on it, then both pull: the same line everywhere.
        let a = vec![d("base"), d("fa")];
        let b = vec![d("base"), d("fb")];
        let r1 = a.clone(); // A's push
        let pb = plan_push(&r1, &b, &none(), 8).unwrap();
        let r2 = pick(&pb, &r1, &b);
        let a2 = pick(&plan_pull(&r2, &a, &none()).unwrap(), &r2, &a);
        let b2 = match plan_pull(&r2, &b, &none()) {
            Some(p) => pick(&p, &r2, &b),
            None => b.clone(),
        };
        assert_eq!(a2, r2);
        assert_eq!(
            b2, r2,
            "B's pull after its own push must give the same line"
        );
        assert_eq!(plan_push(&r2, &a2, &none(), 8), None);
    }

    #[test]
    fn squashed_bases() {
        // A local squash of layers the registry has is nothing new…
        let remote = [d("a"), d("b"), d("c")];
        let local = [s("S", &["a", "b", "c"])];
        assert_eq!(plan_push(&remote, &local, &none(), 8), None);
        assert_eq!(plan_pull(&remote, &local, &none()), None);
        // …unless the remote line is too deep: then it is pushed as the new base.
        assert_eq!(plan_push(&remote, &local, &none(), 2), Some(vec![Local(0)]));
        // A squash that folds an unpushed delta is new.
        let local = [s("S", &["a", "b", "c", "x"])];
        assert_eq!(plan_push(&remote, &local, &none(), 8), Some(vec![Local(0)]));
        // A remote squash covering what we have, plus our unpushed delta on top.
        let remote = [s("R", &["a", "b"])];
        let local = [d("a"), d("b"), d("mine")];
        assert_eq!(
            plan_push(&remote, &local, &none(), 8),
            Some(vec![Remote(0), Local(2)])
        );
        assert_eq!(
            plan_pull(&remote, &local, &none()),
            None,
            "R folds nothing new for us"
        );
    }

    #[test]
    fn rollback_then_push_replaces_the_remote_line() {
        let remote = [d("good"), d("poison")];
        let local = [d("good")];
        let t = undone(&["poison"]);
        // Without the tombstone the rollback is invisible: nothing to push, and a pull brings
        // the poison back on top.
        assert_eq!(plan_push(&remote, &local, &none(), 8), None);
        assert_eq!(
            plan_pull(&remote, &local, &none()),
            Some(vec![Remote(0), Remote(1)])
        );
        // With it: the push makes the line the rolled-back one, and the undone layer is never
        // pulled back before that push.
        assert_eq!(plan_push(&remote, &local, &t, 8), Some(vec![Remote(0)]));
        assert!(!remote_has_news(&remote, &local, &t));
        assert_eq!(plan_pull(&remote, &local, &t), None);
        // A node behind the remote still removes the undone layer, keeping what it lacks.
        let remote = [d("good"), d("poison"), d("other")];
        assert_eq!(
            plan_push(&remote, &local, &t, 8),
            Some(vec![Remote(0), Remote(2)])
        );
        assert!(remote_has_news(&remote, &local, &t));
        // Rolled back across a squash: the base that folds the undone layer is dead too.
        let remote = [s("S", &["good", "poison"])];
        let local = [d("good")];
        assert_eq!(plan_push(&remote, &local, &t, 8), Some(vec![Local(0)]));
        // Once pushed, both sides agree.
        let r2 = pick(&plan_push(&remote, &local, &t, 8).unwrap(), &remote, &local);
        assert_eq!(r2, local);
        assert_eq!(plan_push(&r2, &local, &t, 8), None);
        assert_eq!(plan_pull(&r2, &local, &t), None);
    }

    #[test]
    fn pull_after_a_remote_rollback_drops_the_undone_layer() {
        let remote = [d("good")];
        let t = undone(&["poison"]);
        // Nothing new on the remote, but the local line holds what it undid.
        let local = [d("good"), d("poison")];
        assert_eq!(
            plan_pull(&remote, &local, &none()),
            None,
            "the old behaviour"
        );
        assert_eq!(plan_pull(&remote, &local, &t), Some(vec![Remote(0)]));
        // A push from that node never puts the poison back either.
        assert_eq!(plan_push(&remote, &local, &t, 8), None);
        // Unpushed work on top of the poison is kept; the poison is not.
        let local = [d("good"), d("poison"), d("mine")];
        assert_eq!(
            plan_pull(&remote, &local, &t),
            Some(vec![Remote(0), Local(2)])
        );
        assert_eq!(
            plan_push(&remote, &local, &t, 8),
            Some(vec![Remote(0), Local(2)])
        );
        // A local squash that folded the poison holds it: dropped, the remote line taken.
        let local = [s("S", &["good", "poison"])];
        assert_eq!(plan_pull(&remote, &local, &t), Some(vec![Remote(0)]));
        assert_eq!(plan_push(&remote, &local, &t, 8), None);
        // A poison the remote already had to drop is not pulled back either.
        let remote = [d("good"), d("poison")];
        let local = [d("good"), d("poison")];
        assert_eq!(plan_pull(&remote, &local, &t), Some(vec![Remote(0)]));
    }

    #[test]
    fn a_layer_committed_after_the_rollback_is_kept_on_both_sides() {
        let t = undone(&["poison"]);
        // The registry has the poison; node B pulled it and committed on top of it.
        let r1 = vec![d("good"), d("poison")];
        let b = vec![d("good"), d("poison"), d("b2")];
        // Node A rolled back and committed `after`, then pushes.
        let a = vec![d("good"), d("after")];
        let r2 = pick(&plan_push(&r1, &a, &t, 8).unwrap(), &r1, &a);
        assert_eq!(r2, vec![d("good"), d("after")]);
        assert_eq!(plan_pull(&r2, &a, &t), None);
        assert_eq!(plan_push(&r2, &a, &t, 8), None);
        // B pulls: A's layer arrives, the poison goes, B's own commit stays on top.
        let b2 = pick(&plan_pull(&r2, &b, &t).unwrap(), &r2, &b);
        assert_eq!(b2, vec![d("good"), d("after"), d("b2")]);
        // B pushes; A pulls; every side ends on the same line, without the poison.
        let r3 = pick(&plan_push(&r2, &b2, &t, 8).unwrap(), &r2, &b2);
        assert_eq!(r3, b2);
        let a2 = pick(&plan_pull(&r3, &a, &t).unwrap(), &r3, &a);
        assert_eq!(a2, r3);
        assert_eq!(plan_push(&r3, &a2, &t, 8), None);
        assert_eq!(plan_pull(&r3, &b2, &t), None);
        // B pushing before pulling gives the same line.
        let r2b = pick(&plan_push(&r2, &b, &t, 8).unwrap(), &r2, &b);
        assert_eq!(r2b, vec![d("good"), d("after"), d("b2")]);
    }
}
