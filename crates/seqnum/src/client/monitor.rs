//! What a run shows while it goes: the `--timeline` CSV, the progress line
//! on a terminal, and the rate-limited error log.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::histogram::Histogram;
use super::report::fmt_us;

/// Width of a timeline row.
pub(crate) const TIMELINE_STEP: Duration = Duration::from_millis(100);
/// Header of the timeline CSV.
pub(crate) const TIMELINE_HEADER: &str = "t_ms,echoes,p50_us,p99_us,max_us,errors";

/// The `--timeline` CSV: one row per [`TIMELINE_STEP`] since the start.
pub(crate) struct Timeline<W: Write = BufWriter<File>> {
    out: W,
    /// Index of the slice being filled.
    slice: u64,
    latency: Histogram,
    errors: u64,
}

impl Timeline {
    /// Creates `path` and writes the header.
    pub(crate) fn create(path: &Path) -> io::Result<Self> {
        Timeline::new(BufWriter::new(File::create(path)?))
    }
}

impl<W: Write> Timeline<W> {
    pub(crate) fn new(mut out: W) -> io::Result<Self> {
        writeln!(out, "{TIMELINE_HEADER}")?;
        out.flush()?;
        Ok(Timeline { out, slice: 0, latency: Histogram::new(), errors: 0 })
    }

    fn slice_of(elapsed: Duration) -> u64 {
        (elapsed.as_nanos() / TIMELINE_STEP.as_nanos()) as u64
    }

    /// Start of the next slice, relative to the start of the run.
    pub(crate) fn next_boundary(&self) -> Duration {
        Duration::from_nanos((self.slice + 1) * TIMELINE_STEP.as_nanos() as u64)
    }

    fn write_row(&mut self) -> io::Result<()> {
        let h = &self.latency;
        writeln!(
            self.out,
            "{},{},{},{},{},{}",
            self.slice * TIMELINE_STEP.as_millis() as u64,
            h.count(),
            h.percentile(0.5),
            h.percentile(0.99),
            h.max(),
            self.errors
        )?;
        self.latency.reset();
        self.errors = 0;
        self.slice += 1;
        Ok(())
    }

    /// Writes every slice that ended before `elapsed`.
    pub(crate) fn roll(&mut self, elapsed: Duration) -> io::Result<()> {
        let now = Self::slice_of(elapsed);
        if now <= self.slice {
            return Ok(());
        }
        while self.slice < now {
            self.write_row()?;
        }
        self.out.flush()
    }

    /// An echo with latency `us` arrived at `elapsed`.
    pub(crate) fn echo(&mut self, elapsed: Duration, us: u64) -> io::Result<()> {
        self.roll(elapsed)?;
        self.latency.record(us);
        Ok(())
    }

    /// An error happened at `elapsed`.
    pub(crate) fn error(&mut self, elapsed: Duration) -> io::Result<()> {
        self.roll(elapsed)?;
        self.errors += 1;
        Ok(())
    }

    /// The run ended at `elapsed`: writes the last, partial slice.
    pub(crate) fn finish(&mut self, elapsed: Duration) -> io::Result<()> {
        self.roll(elapsed)?;
        self.write_row()?;
        self.out.flush()
    }

    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out
    }
}

/// The once-a-second progress line on a terminal's stderr.
pub(crate) struct Progress {
    next: Instant,
    window_start: Instant,
    latency: Histogram,
    shown: bool,
}

impl Progress {
    pub(crate) fn new(start: Instant) -> Self {
        Progress { next: start + Duration::from_secs(1), window_start: start, latency: Histogram::new(), shown: false }
    }

    /// When the next line is due.
    pub(crate) fn next(&self) -> Instant {
        self.next
    }

    pub(crate) fn echo(&mut self, us: u64) {
        self.latency.record(us);
    }

    /// Prints the line if it is due.
    pub(crate) fn tick(&mut self, now: Instant, elapsed: Duration, live: usize, errors: u64) {
        if now < self.next {
            return;
        }
        let window = now.duration_since(self.window_start).as_secs_f64().max(1e-3);
        let h = &self.latency;
        let line = format!(
            "\r{:8.1}s  live {live}  {:.0} echoes/s  p99 {}  max {}  errors {errors}\x1b[K",
            elapsed.as_secs_f64(),
            h.count() as f64 / window,
            fmt_us(h.percentile(0.99)),
            fmt_us(h.max()),
        );
        let mut err = io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
        self.shown = true;
        self.latency.reset();
        self.window_start = now;
        while self.next <= now {
            self.next += Duration::from_secs(1);
        }
    }

    /// Erases the line, before a log line or at the end.
    pub(crate) fn clear(&mut self) {
        if self.shown {
            let mut err = io::stderr().lock();
            let _ = err.write_all(b"\r\x1b[K");
            let _ = err.flush();
            self.shown = false;
        }
    }
}

/// At most this many errors are logged one by one.
pub(crate) const MAX_LOGGED_ERRORS: u64 = 20;

/// Counts errors past [`MAX_LOGGED_ERRORS`].
#[derive(Debug, Default)]
pub(crate) struct ErrorLog {
    seen: u64,
}

impl ErrorLog {
    /// Notes one more error; true if it should be logged.
    pub(crate) fn admit(&mut self) -> bool {
        self.seen += 1;
        if self.seen == MAX_LOGGED_ERRORS + 1 {
            tracing::warn!("more errors: not logging them one by one (see the counts at the end)");
        }
        self.seen <= MAX_LOGGED_ERRORS
    }

    /// Logs how many errors were not logged.
    pub(crate) fn finish(&self) {
        if self.seen > MAX_LOGGED_ERRORS {
            tracing::warn!(
                "{} errors were not logged individually ({} in all)",
                self.seen - MAX_LOGGED_ERRORS,
                self.seen
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_rows() {
        let ms = Duration::from_millis;
        let mut t = Timeline::new(Vec::new()).unwrap();
        t.echo(ms(10), 100).unwrap();
        t.echo(ms(50), 300).unwrap();
        t.error(ms(99)).unwrap();
        assert_eq!(t.next_boundary(), ms(100));
        // Nothing in 100..300: two empty rows.
        t.echo(ms(320), 1000).unwrap();
        t.finish(ms(350)).unwrap();
        let text = String::from_utf8(t.into_inner()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [TIMELINE_HEADER, "0,2,100,300,300,1", "100,0,0,0,0,0", "200,0,0,0,0,0", "300,1,1000,1000,1000,0",]
        );
    }

    #[test]
    fn error_log_limit() {
        let mut log = ErrorLog::default();
        let admitted = (0..100).filter(|_| log.admit()).count() as u64;
        assert_eq!(admitted, MAX_LOGGED_ERRORS);
    }
}
