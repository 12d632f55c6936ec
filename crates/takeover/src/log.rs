//! Logging set-up shared by the binaries: `tracing` to stderr, filtered by
//! `RUST_LOG` (default `info`). Under systemd (`JOURNAL_STREAM` set, stderr
//! connected to the journal) each line starts with the sd-daemon `<N>`
//! priority prefix and carries no timestamp (the journal adds its own), so
//! `journalctl -p warning` works.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Prefixes each line with `<N>` (under the journal) and `name[pid]: `.
struct Prefixed<T> {
    journal: bool,
    tag: String,
    inner: Format<tracing_subscriber::fmt::format::Full, T>,
}

impl<S, N, T> FormatEvent<S, N> for Prefixed<T>
where
    Format<tracing_subscriber::fmt::format::Full, T>: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if self.journal {
            let prio = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{prio}>")?;
        }
        write!(writer, "{}: ", self.tag)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// True when stderr is the journal stream systemd gave us (`JOURNAL_STREAM`
/// names stderr's device and inode).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => st.st_dev.to_string() == dev && st.st_ino.to_string() == ino,
        Err(_) => false,
    }
}

/// Installs the global subscriber. `binary` and the pid start each line, as
/// a supervisor and its workers end up in one stream (takeoverd forwards its
/// workers' stderr to its own, and so to one journal stream).
pub fn init(binary: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).fmt_fields(DefaultFields::new());
    let tag = format!("{binary}[{}]", std::process::id());
    if stderr_is_journal() {
        let inner = Format::default().without_time().with_target(false);
        let _ = builder.with_ansi(false).event_format(Prefixed { journal: true, tag, inner }).try_init();
    } else {
        let inner = Format::default().with_target(false).with_ansi(std::io::stderr().is_terminal());
        let _ = builder
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Prefixed { journal: false, tag, inner })
            .try_init();
    }
}

/// An error and its causes, joined by `: ` as anyhow's `{:#}` joins them,
/// leaving out a cause whose text the message already carries: the errors
/// of this crate (and `io::Error`s wrapping them) include their source's
/// text and also return it from `source()`.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (for status lines and reports).
pub fn utc(unix: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    // `2026-11-18T11:06:40Z`
    let rfc3339 = humantime::format_rfc3339_seconds(t).to_string();
    format!("{} UTC", rfc3339.trim_end_matches('Z').replacen('T', " ", 1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_report_names_each_cause_once() {
        let inner = crate::Error::io("connecting", std::io::Error::from_raw_os_error(libc::ENOENT));
        let outer = std::io::Error::other(inner);
        assert_eq!(super::report(&outer), "connecting: No such file or directory (os error 2)");
        #[derive(Debug)]
        struct Context(std::io::Error);
        impl std::fmt::Display for Context {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("taking over")
            }
        }
        impl std::error::Error for Context {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Context(outer);
        assert_eq!(super::report(&e), "taking over: connecting: No such file or directory (os error 2)");
    }

    #[test]
    fn formats_utc() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(1_795_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(4_107_542_399), "2100-02-28 23:59:59 UTC");
    }
}
