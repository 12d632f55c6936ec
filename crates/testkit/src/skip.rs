//! A visible skip: a test that cannot run here says so on stderr, as
//! `SKIP: <test>: <why>`, and fails instead under `CI=true`, where every
//! test must run.

/// Whether every test must run (`CI=true`): a skip is then a failure.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Reports that the calling test is skipped, and why; panics under
/// `CI=true`. The test's name is its thread's (libtest names each test's
/// thread after it). The line goes straight to fd 2: libtest captures
/// `eprintln!` of a passing test, which would hide the skip.
pub fn skip(why: &str) {
    use std::io::Write;
    let current = std::thread::current();
    let test = current.name().unwrap_or("?");
    assert!(!required(), "{test} cannot run here: {why} (CI=true: failing rather than skipping)");
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
}
