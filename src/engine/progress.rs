//! Progress of long operations, for whoever waits on them: the hook through which the CLI draws
//! a bar on a terminal ([`ProgressHook`]), and the meter of a registry transfer ([`Meter`]),
//! which `cache import` and `cache export` count bytes into where they stream (the tar as it
//! is written, the blob as it is read), an add per buffer. Without a hook (not a terminal; the
//! agent) a transfer logs a line every [`LOG_EVERY`], and at each tenth of a transfer of
//! [`LOG_TENTHS_FROM`] or more, so that a log says how far a long import got and how fast.
//!
//! The arithmetic (rate, time left, when a line is due) is pure: [`Snapshot`] and [`log_due`].

use crate::files::copy::CopyStats;
use crate::input::quantity::human_bytes;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A log line at least this often while a transfer runs (without a hook).
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Transfers of this many bytes or more also log at each tenth.
pub const LOG_TENTHS_FROM: u64 = 64 << 20;

/// The hook is told at most this often (a terminal redraws no faster anyway).
const HOOK_EVERY: Duration = Duration::from_millis(100);

/// No rate is told before this: the first buffers say little of the steady rate.
const RATE_AFTER: Duration = Duration::from_millis(500);

/// A counting reader or writer hands its bytes to the meter in batches of this many.
const BATCH: u64 = 1 << 20;

/// Receives progress of long operations: the operation's name and where it is. The CLI draws
/// a bar with it on a terminal.
#[derive(Clone)]
pub struct ProgressHook(pub Arc<ProgressFn>);

/// The callback inside a [`ProgressHook`].
pub type ProgressFn = dyn Fn(&str, Progress<'_>) + Send + Sync;

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// Where a long operation is.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// A tree being copied (squash, resize): entries and bytes so far, of a total not known.
    Copy(&'a CopyStats),
    /// Bytes moved of an expected total (import, export).
    Transfer(&'a Snapshot),
}

/// A transfer at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Bytes moved.
    pub done: u64,
    /// Bytes expected (never less than `done`: an export's total is an estimate).
    pub total: u64,
    /// Since the transfer started.
    pub elapsed: Duration,
}

impl Snapshot {
    /// Bytes per second so far, once there is something to tell.
    pub fn rate(&self) -> Option<f64> {
        (self.elapsed >= RATE_AFTER && self.done > 0)
            .then(|| self.done as f64 / self.elapsed.as_secs_f64())
    }

    /// Time left at the rate so far (none when nothing is left).
    pub fn eta(&self) -> Option<Duration> {
        let left = self.total.saturating_sub(self.done);
        if left == 0 {
            return Some(Duration::ZERO);
        }
        // At most a year: a rate of a few bytes a second tells nothing more precise.
        let secs = (left as f64 / self.rate()?).min(365.0 * 86400.0);
        Some(Duration::from_secs_f64(secs))
    }

    /// Whole percent of the total (100 when nothing is expected).
    pub fn percent(&self) -> u64 {
        match self.total {
            0 => 100,
            t => (u128::from(self.done.min(t)) * 100 / u128::from(t)) as u64,
        }
    }

    /// `48.0 MiB of 96.0 MiB (50%), 12.0 MiB/s, 4 s left`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} of {} ({}%)",
            human_bytes(self.done),
            human_bytes(self.total),
            self.percent()
        );
        if let Some(rate) = self.rate() {
            s.push_str(&format!(", {}/s", human_bytes(rate as u64)));
        }
        if let (Some(eta), true) = (self.eta(), self.done < self.total) {
            s.push_str(&format!(", {} left", human_duration(eta)));
        }
        s
    }
}

/// `4 s`, `2 min 05 s`, `1 h 02 min` (whole seconds, rounded up: "0 s left" only at the end).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

/// Whether a log line is due at `now`, the last one having been at `last` (the default: the
/// start): [`LOG_EVERY`] has passed, or a transfer of [`LOG_TENTHS_FROM`] or more reached a
/// further tenth. Tenths are of the total now (it may have changed since).
pub fn log_due(last: &Snapshot, now: &Snapshot) -> bool {
    let tenths = |done: u64| Snapshot { done, ..*now }.percent() / 10;
    now.elapsed.saturating_sub(last.elapsed) >= LOG_EVERY
        || (now.total >= LOG_TENTHS_FROM && tenths(now.done) > tenths(last.done))
}

/// The meter of one transfer. Shared by reference between the threads that move its bytes.
#[derive(Debug)]
pub struct Meter {
    what: String,
    hook: Option<ProgressHook>,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    done: u64,
    total: u64,
    /// Where the last log line was.
    logged: Snapshot,
    /// When the hook was last told.
    hooked: Option<Duration>,
}

impl Meter {
    /// A transfer of about `total` bytes, named `what` in its bar and its log lines; `hook` is
    /// the engine's (a bar on a terminal) or none (log lines).
    pub fn new(what: impl Into<String>, total: u64, hook: Option<ProgressHook>) -> Meter {
        Meter {
            what: what.into(),
            hook,
            started: Instant::now(),
            state: Mutex::new(State {
                total,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A thread that panicked mid-count leaves numbers that are still numbers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` more bytes moved.
    pub fn add(&self, n: u64) {
        let mut s = self.state();
        s.done += n;
        self.tell(&mut s, false);
    }

    /// The total is `total` after all (a layer the registry had is not sent).
    pub fn set_total(&self, total: u64) {
        self.state().total = total;
    }

    /// The expected total, as it stands.
    pub fn total(&self) -> u64 {
        self.state().total
    }

    /// Bytes moved so far.
    pub fn done(&self) -> u64 {
        self.state().done
    }

    /// Back to `done` bytes (a layer moved again from its start).
    pub fn rewind(&self, done: u64) {
        let mut s = self.state();
        s.done = done.min(s.done);
        s.logged.done = s.logged.done.min(s.done);
    }

    /// The transfer ended, all of it moved: the bar shows 100%, and a log that told its
    /// progress tells its end.
    pub fn finish(&self) {
        let mut s = self.state();
        s.total = s.done;
        self.tell(&mut s, true);
    }

    /// Counts what `inner` reads.
    pub fn reader<R>(&self, inner: R) -> Counted<'_, R> {
        Counted {
            inner,
            meter: self,
            pending: 0,
        }
    }

    /// Counts what is written through to `inner`.
    pub fn writer<W>(&self, inner: W) -> Counted<'_, W> {
        Counted {
            inner,
            meter: self,
            pending: 0,
        }
    }

    fn snapshot(&self, s: &State) -> Snapshot {
        Snapshot {
            done: s.done,
            total: s.total.max(s.done),
            elapsed: self.started.elapsed(),
        }
    }

    fn tell(&self, s: &mut State, last: bool) {
        let now = self.snapshot(s);
        match &self.hook {
            Some(h) => {
                if last
                    || s.hooked
                        .is_none_or(|t| now.elapsed.saturating_sub(t) >= HOOK_EVERY)
                {
                    s.hooked = Some(now.elapsed);
                    (h.0)(&self.what, Progress::Transfer(&now));
                }
            }
            None => {
                let told = s.logged != Snapshot::default();
                if (last && told && s.logged.done < now.done) || (!last && log_due(&s.logged, &now))
                {
                    s.logged = now;
                    tracing::info!(
                        done = now.done,
                        total = now.total,
                        "{}: {}",
                        self.what,
                        now.describe()
                    );
                }
            }
        }
    }
}

/// A reader or writer whose bytes a [`Meter`] counts (in batches: a buffer costs an add).
pub struct Counted<'m, T> {
    inner: T,
    meter: &'m Meter,
    pending: u64,
}

impl<T> Counted<'_, T> {
    fn count(&mut self, n: usize) {
        self.pending += n as u64;
        if self.pending >= BATCH {
            self.meter.add(std::mem::take(&mut self.pending));
        }
    }
}

impl<T> Drop for Counted<'_, T> {
    fn drop(&mut self) {
        if self.pending > 0 {
            self.meter.add(self.pending);
        }
    }
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count(n);
        Ok(n)
    }
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn at(done: u64, total: u64, ms: u64) -> Snapshot {
        Snapshot {
            done,
            total,
            elapsed: Duration::from_millis(ms),
        }
    }

    #[test]
    fn rate_eta_and_percent() {
        // 48 MiB of 96 in 4 s: 12 MiB/s, 4 s left, half done.
        let s = at(48 * MIB, 96 * MIB, 4000);
        assert_eq!(s.rate(), Some(12.0 * MIB as f64));
        assert_eq!(s.eta(), Some(Duration::from_secs(4)));
        assert_eq!(s.percent(), 50);
        assert_eq!(
            s.describe(),
            "48.0 MiB of 96.0 MiB (50%), 12.0 MiB/s, 4 s left"
        );
        // Too early, or nothing moved yet: no rate, no time left; the percent still.
        for s in [at(MIB, 96 * MIB, 499), at(0, 96 * MIB, 10_000)] {
            assert_eq!((s.rate(), s.eta()), (None, None), "{s:?}");
            assert_eq!(s.describe().matches(", ").count(), 0, "{}", s.describe());
        }
        // Done: nothing left, whatever the rate; and nothing expected is done too.
        let s = at(96 * MIB, 96 * MIB, 100);
        assert_eq!((s.eta(), s.percent()), (Some(Duration::ZERO), 100));
        assert_eq!(s.describe(), "96.0 MiB of 96.0 MiB (100%)");
        assert_eq!(at(0, 0, 0).percent(), 100);
        // Percent rounds down, so 100 means all of it; no overflow at the largest sizes.
        assert_eq!(at(999, 1000, 1).percent(), 99);
        assert_eq!(at(u64::MAX / 2, u64::MAX, 1).percent(), 49);
        // A crawl: time left is capped at a year rather than overflowing a Duration.
        let s = at(1, u64::MAX, 1000);
        assert_eq!(s.eta(), Some(Duration::from_secs(365 * 86400)));
        // Time left rounds up to whole seconds.
        assert_eq!(
            at(90 * MIB, 96 * MIB, 10_000).describe(),
            "90.0 MiB of 96.0 MiB (93%), 9.0 MiB/s, 1 s left"
        );
    }

    #[test]
    fn durations_read_as_people_say_them() {
        let d = Duration::from_secs;
        assert_eq!(human_duration(d(0)), "0 s");
        assert_eq!(human_duration(Duration::from_millis(1)), "1 s");
        assert_eq!(human_duration(d(59)), "59 s");
        assert_eq!(human_duration(d(60)), "1 min 00 s");
        assert_eq!(human_duration(d(125)), "2 min 05 s");
        assert_eq!(human_duration(d(3599)), "59 min 59 s");
        assert_eq!(human_duration(d(3720)), "1 h 02 min");
        assert_eq!(human_duration(d(365 * 86400)), "8760 h 00 min");
    }

    #[test]
    fn log_lines_are_due_every_few_seconds_and_at_each_tenth_of_a_big_transfer() {
        let big = 100 * MIB;
        // From the start, which knows no total.
        assert!(!log_due(&Snapshot::default(), &at(MIB, big, 1000)));
        assert!(log_due(&Snapshot::default(), &at(10 * MIB, big, 1000)));
        let last = at(0, big, 0);
        assert!(
            !log_due(&last, &at(9 * MIB, big, 1000)),
            "under a tenth, under 5 s"
        );
        assert!(log_due(&last, &at(10 * MIB, big, 1000)), "a tenth");
        assert!(log_due(&last, &at(MIB, big, 5000)), "5 s");
        let last = at(10 * MIB, big, 1000);
        assert!(!log_due(&last, &at(19 * MIB, big, 5999)));
        assert!(log_due(&last, &at(20 * MIB, big, 1001)));
        assert!(log_due(&last, &at(11 * MIB, big, 6000)));
        // The total grew (an export's estimate): tenths are of the new one.
        assert!(!log_due(&last, &at(19 * MIB, 2 * big, 1001)));
        assert!(log_due(&last, &at(20 * MIB, 2 * big, 1001)));
        // A small transfer: by time only.
        let small = LOG_TENTHS_FROM - 1;
        assert!(!log_due(&at(0, small, 0), &at(small / 2, small, 4999)));
        assert!(log_due(&at(0, small, 0), &at(small / 2, small, 5000)));
        // Every tenth of a steady big transfer logs once: ten lines, and no more.
        let mut last = at(0, big, 0);
        let mut lines = 0;
        for step in 1..=1000 {
            let now = at(big * step / 1000, big, step);
            if log_due(&last, &now) {
                lines += 1;
                last = now;
            }
        }
        assert_eq!(lines, 10);
    }

    #[test]
    fn a_meter_counts_what_streams_through_it_and_tells_its_hook() {
        let told = Arc::new(Mutex::new(Vec::<(String, Snapshot)>::new()));
        let t = told.clone();
        let hook = ProgressHook(Arc::new(move |what: &str, p: Progress<'_>| {
            if let Progress::Transfer(s) = p {
                t.lock().unwrap().push((what.to_string(), *s));
            }
        }));
        let m = Meter::new("import x", 3 * MIB, Some(hook));
        let data = vec![7u8; (3 * MIB) as usize];
        let mut out = Vec::new();
        std::io::copy(&mut m.reader(&data[..]), &mut m.writer(&mut out)).unwrap();
        // Read and written: each byte counted twice here, once per side.
        assert_eq!(m.done(), 6 * MIB);
        m.rewind(2 * MIB);
        assert_eq!(m.done(), 2 * MIB);
        m.set_total(5 * MIB);
        assert_eq!(m.total(), 5 * MIB);
        m.finish();
        let told = told.lock().unwrap();
        assert_eq!(told[0].0, "import x");
        // The first batch is told at once, the end always (all of it moved); in between at
        // most every 100 ms.
        assert_eq!(told[0].1.done, MIB);
        let end = told.last().unwrap().1;
        assert_eq!((end.done, end.total), (2 * MIB, 2 * MIB));
        // A total under what moved reads as all of it.
        let m = Meter::new("export y", MIB, None);
        m.add(2 * MIB);
        assert_eq!(m.snapshot(&m.state()).total, 2 * MIB);
    }
}
