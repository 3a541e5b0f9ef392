//! Human output: aligned tables with human-readable sizes, and JSON for scripts.

use jobcachefs::engine::{CacheInfo, DeleteOutcome, GcReport, PruneCandidate, VolumeInfo};
use jobcachefs::input::quantity::human_bytes;
use serde::Serialize;

/// Prints any serialisable value as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}

/// Prints `value` as JSON, or as `table` prints it.
pub fn json_or<T: Serialize + ?Sized>(json: bool, value: &T, table: impl FnOnce(&T)) {
    if json {
        print_json(value);
    } else {
        table(value);
    }
}

/// One line on what a delete did to the volume's changes (`volume delete` and the hook's
/// teardown).
pub fn describe_delete(outcome: &DeleteOutcome) -> String {
    match outcome {
        DeleteOutcome::NotFound => "no volume there (already deleted)".to_string(),
        DeleteOutcome::RolledBack => "half-made volume rolled back".to_string(),
        DeleteOutcome::Discarded => "deleted, changes discarded".to_string(),
        DeleteOutcome::NotCommitted { reason } => format!("deleted, not committed: {reason}"),
        DeleteOutcome::Unchanged => "deleted, nothing changed to commit".to_string(),
        DeleteOutcome::Declined { reason } => format!("deleted, changes discarded: {reason}"),
        DeleteOutcome::Committed {
            generation,
            squashed,
            scope,
        } => format!(
            "deleted, committed as generation {generation}{}{}",
            scope
                .as_ref()
                .map(|s| format!(" of scope {s}"))
                .unwrap_or_default(),
            match (squashed, scope) {
                (true, None) => " (squashed to fit the cache-size)",
                (true, Some(_)) => " (its layers merged to fit the scope-size)",
                _ => "",
            }
        ),
        DeleteOutcome::Rejected { reason } => format!("deleted; {reason}"),
    }
}

/// A plain aligned text table.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let cols = self.rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
                .collect();
            println!("{}", line.join("  ").trim_end());
        }
    }
}

/// Age of a Unix timestamp, e.g. `3h ago`.
pub fn ago(ts: u64) -> String {
    let now = jobcachefs::state::fsutil::now();
    let d = now.saturating_sub(ts);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

pub fn print_caches(caches: &[CacheInfo]) {
    let mut t = Table::new(&[
        "NAMESPACE",
        "NAME",
        "MODE",
        "GEN",
        "DEPTH",
        "ALLOCATED",
        "LIMIT",
        "USE%",
        "VOLUMES",
        "SCOPES",
        "LAST USED",
    ]);
    for c in caches {
        t.row(vec![
            c.namespace.clone(),
            c.name.clone(),
            c.mode.to_string(),
            c.generation.to_string(),
            c.depth.to_string(),
            human_bytes(c.allocated),
            human_bytes(c.cache_size),
            format!("{}%", c.allocated * 100 / c.cache_size.max(1)),
            c.volumes.len().to_string(),
            c.scopes.len().to_string(),
            ago(c.last_used),
        ]);
    }
    t.print();
}

pub fn print_scope_history(h: &[jobcachefs::state::records::ScopeEvent]) {
    let mut t = Table::new(&["GEN", "PUBLISHED", "KIND", "LAYERS", "SOURCE"]);
    for e in h {
        t.row(vec![
            e.generation.to_string(),
            ago(e.published),
            e.kind.clone(),
            e.layers.to_string(),
            e.source.clone(),
        ]);
    }
    t.print();
}

pub fn print_holdings(view: &[jobcachefs::k8s::placement::Holding]) {
    let mut t = Table::new(&[
        "CACHE",
        "NODE",
        "GEN",
        "MODE",
        "ALLOCATED",
        "LIMIT",
        "LAST USED",
    ]);
    for h in view {
        t.row(vec![
            h.cache.clone(),
            h.node.clone(),
            h.details.generation.to_string(),
            h.details.mode.clone(),
            human_bytes(h.details.allocated),
            human_bytes(h.details.limit),
            ago(h.details.last_used),
        ]);
    }
    t.print();
}

pub fn print_cache(c: &CacheInfo) {
    println!("Cache:       {}/{}", c.namespace, c.name);
    println!("Mode:        {}", c.mode);
    println!(
        "Generation:  {} ({} layers{})",
        c.generation,
        c.depth,
        if c.squash_due { ", squash queued" } else { "" }
    );
    println!(
        "Allocated:   {} of {} ({}%), {} on disk incl. layers old volumes still use",
        human_bytes(c.allocated),
        human_bytes(c.cache_size),
        c.allocated * 100 / c.cache_size.max(1),
        human_bytes(c.on_disk)
    );
    println!("Created:     {}", ago(c.created));
    println!("Last used:   {}", ago(c.last_used));
    println!("Layers (base first):");
    let mut t = Table::new(&["  #", "ID", "SIZE", "ALLOCATED", "CREATED", "FROM"]);
    for (i, l) in c.layers.iter().enumerate() {
        t.row(vec![
            format!("  {i}"),
            l.id.clone(),
            human_bytes(l.size),
            human_bytes(l.allocated),
            ago(l.created),
            l.source.clone(),
        ]);
    }
    t.print();
    if let Some(base) = c.layers.first().filter(|b| !b.data.is_empty()) {
        // A metadata base: its files' data lives in the data layers below it.
        let u = base.data_usage;
        println!(
            "Data layers: {} below the metadata base, {} allocated, {} of it shadowed (files later layers replaced){}",
            base.data.len(),
            human_bytes(u.allocated),
            human_bytes(u.shadowed()),
            if u.too_shadowed() {
                ": the next squash is a full one"
            } else {
                ""
            }
        );
    }
    println!("Live volumes: {}", c.volumes.len());
    for v in &c.volumes {
        println!("  {}", v.display());
    }
    println!("Scopes: {}", c.scopes.len());
    if !c.scopes.is_empty() {
        let mut t = Table::new(&[
            "  SCOPE",
            "GEN",
            "LAYERS",
            "ALLOCATED",
            "VOLUMES",
            "LAST USED",
        ]);
        for s in &c.scopes {
            t.row(vec![
                format!("  {}", s.scope),
                s.generation.to_string(),
                s.layers.to_string(),
                human_bytes(s.allocated),
                s.volumes.len().to_string(),
                ago(s.last_used),
            ]);
        }
        t.print();
    }
}

pub fn print_volumes(vols: &[VolumeInfo]) {
    let mut t = Table::new(&[
        "DIR",
        "CACHE",
        "GEN",
        "USED",
        "SIZE",
        "WRITE-BACK",
        "STATE",
        "CREATED",
    ]);
    for v in vols {
        let r = &v.record;
        t.row(vec![
            r.dir.display().to_string(),
            r.cache
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            r.generation.to_string(),
            v.used.map(human_bytes).unwrap_or_else(|| "-".into()),
            human_bytes(r.size),
            r.write_back.to_string(),
            format!(
                "{:?}{}",
                r.state,
                if v.mounted { "" } else { " (not mounted)" }
            )
            .to_lowercase(),
            ago(r.created),
        ]);
    }
    t.print();
}

pub fn print_prune(plan: &[PruneCandidate], dry_run: bool) {
    if plan.is_empty() {
        println!("nothing to prune");
        return;
    }
    let mut t = Table::new(&["NAMESPACE", "NAME", "SCOPE", "FREES", "LAST USED", "REASON"]);
    for c in plan {
        t.row(vec![
            c.namespace.clone(),
            c.name.clone(),
            c.scope.clone().unwrap_or_else(|| "(whole cache)".into()),
            human_bytes(c.frees),
            ago(c.last_used),
            c.reason.clone(),
        ]);
    }
    t.print();
    let total: u64 = plan.iter().map(|c| c.frees).sum();
    let scopes = plan.iter().filter(|c| c.scope.is_some()).count();
    println!(
        "{} {} caches and {scopes} scopes, {}",
        if dry_run { "would remove" } else { "removed" },
        plan.len() - scopes,
        human_bytes(total)
    );
}

pub fn print_gc(r: &GcReport) {
    let show = |label: &str, items: Vec<String>| {
        for i in items {
            println!("{label}: {i}");
        }
    };
    show(
        "rolled back",
        r.rolled_back
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    );
    show(
        "finished delete",
        r.deletes_finished
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    );
    show(
        "remounted",
        r.remounted
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    );
    show(
        "discarded the volume of a killed run",
        r.runs_repaired
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    );
    show("removed layer", r.layers_removed.clone());
    show(
        "unmounted",
        r.mounts_removed
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    );
    show(
        "detached",
        r.loops_detached
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    );
    show(
        "removed half-built",
        r.tmp_removed
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    );
    show("squashed", r.squashed.clone());
    show("merged past the depth bound", r.merged.clone());
    show("idle scope removed", r.scopes_removed.clone());
    show("error", r.errors.clone());
}

pub fn print_doctor(findings: &[jobcachefs::doctor::Finding]) {
    use jobcachefs::doctor::Status;
    for f in findings {
        let mark = match f.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        println!("[{mark}] {}: {}", f.check, f.detail);
        if !f.fix.is_empty() {
            println!("       fix: {}", f.fix);
        }
    }
    let fails = findings.iter().filter(|f| f.status == Status::Fail).count();
    let warns = findings.iter().filter(|f| f.status == Status::Warn).count();
    println!(
        "{} checks: {fails} failed, {warns} warnings",
        findings.len()
    );
}

/// A progress display on stderr for long operations, when stderr is a terminal: a spinner with
/// the entries and bytes of a copy (squash, resize), a bar with bytes, rate and time left of a
/// transfer (import, export). Not on a terminal the engine logs instead (a line every few
/// seconds for a transfer).
pub fn progress_hook() -> Option<jobcachefs::engine::ProgressHook> {
    use indicatif::{ProgressBar, ProgressStyle};
    use jobcachefs::engine::Progress;
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let spinner = ProgressStyle::with_template("{spinner} {msg} [{elapsed}] {prefix}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let transfer = ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::new_spinner();
    bar.set_style(spinner.clone());
    // Whether the bar is drawn as a transfer now (one command may copy, then transfer).
    let drawn_as_transfer = std::sync::Mutex::new(false);
    let restyle = move |bar: &ProgressBar, as_transfer: bool| {
        let mut now = drawn_as_transfer.lock().unwrap_or_else(|e| e.into_inner());
        if *now != as_transfer {
            bar.set_style(if as_transfer {
                transfer.clone()
            } else {
                spinner.clone()
            });
            *now = as_transfer;
        }
    };
    let hook = move |name: &str, p: Progress<'_>| match p {
        Progress::Copy(s) => {
            if s.entries.is_multiple_of(64) {
                restyle(&bar, false);
                bar.set_message(name.to_string());
                bar.set_prefix(format!("{} entries, {}", s.entries, human_bytes(s.bytes)));
                bar.tick();
            }
        }
        Progress::Transfer(t) => {
            restyle(&bar, true);
            bar.set_prefix(name.to_string());
            bar.set_length(t.total);
            bar.set_position(t.done);
            bar.set_message(t.describe());
        }
    };
    Some(jobcachefs::engine::ProgressHook(std::sync::Arc::new(hook)))
}

/// `cache history` as a table.
pub fn print_history(h: &[jobcachefs::engine::HistoryEntry]) {
    let mut t = Table::new(&["GEN", "CREATED", "KIND", "SOURCE", "ADDED", "BYTES", ""]);
    for e in h {
        let who = ["pvc-namespace", "pvc", "node"]
            .iter()
            .filter_map(|k| e.details.get(*k).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>();
        t.row(vec![
            e.generation.to_string(),
            ago(e.created),
            e.kind.clone(),
            if who.is_empty() {
                e.source.clone()
            } else {
                format!("{} ({})", e.source, who.join(" "))
            },
            format!(
                "{} layer(s), {}",
                e.layers_added.len(),
                human_bytes(e.bytes_added)
            ),
            human_bytes(e.bytes),
            match (e.current, e.restorable) {
                (true, _) => "current".into(),
                (false, true) => "restorable".into(),
                (false, false) => String::new(),
            },
        ]);
    }
    t.print();
}
