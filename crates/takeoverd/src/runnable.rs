//! Whether a worker binary can be started, checked before takeoverd starts
//! anything (`--worker` at start, the binary `ctl upgrade` would execute):
//! missing, not a regular file, or not executable by the user it would run
//! as, each with advice for the operator.

use std::path::Path;

/// Why a worker binary cannot be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unrunnable {
    /// There is no such file (or no such file in `$PATH` for a bare name).
    Missing(String),
    /// It is a directory, a socket, ...
    NotRegular(String),
    /// The worker's user may not execute it.
    NotExecutable(String),
    /// Anything else (a lookup that failed).
    Other(String),
}

impl std::fmt::Display for Unrunnable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unrunnable::Missing(why)
            | Unrunnable::NotRegular(why)
            | Unrunnable::NotExecutable(why)
            | Unrunnable::Other(why) => f.write_str(why),
        }
    }
}

impl Unrunnable {
    /// What to do about it. `default` is true when the path is the default
    /// worker (no `--worker`).
    pub fn advice(&self, default: bool) -> &'static str {
        match (self, default) {
            (Unrunnable::Missing(_), true) => "install seqnum-worker beside takeoverd, or pass --worker PATH",
            (Unrunnable::Missing(_), false) => "pass --worker PATH, or install seqnum-worker beside takeoverd",
            (Unrunnable::NotRegular(_), _) => "pass --worker PATH naming the worker's executable",
            (Unrunnable::NotExecutable(_), _) => "let the worker's user execute it, or pass --worker PATH",
            (Unrunnable::Other(_), _) => "check the file, or pass --worker PATH",
        }
    }
}

/// Checks that `path` names a worker that `exec` can start as `user`
/// (`--worker-user`), or as takeoverd's own user when `None`: it exists, is
/// a regular file, and that user may execute it. A bare name (no `/`) is
/// looked up in `$PATH`, as `exec` does.
///
/// For takeoverd's own user the kernel decides (`faccessat(X_OK,
/// AT_EACCESS)`: mode bits, ACLs, `noexec` mounts). For another user,
/// which only root can switch to, the kernel's answer for root comes first
/// (it catches `noexec` and a file no one may execute); then the mode bits
/// of the file and of every directory above it must allow that user and its
/// primary group (the worker gets no supplementary groups); ACLs are not
/// consulted.
pub fn check_runnable(path: &Path, user: Option<&nix::unistd::User>) -> Result<(), Unrunnable> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().contains(&b'/') {
        return check_file(path, user);
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    let mut first_problem = None;
    for dir in std::env::split_paths(&search) {
        let dir = if dir.as_os_str().is_empty() { std::path::PathBuf::from(".") } else { dir };
        let candidate = dir.join(path);
        match check_file(&candidate, user) {
            Ok(()) => return Ok(()),
            Err(Unrunnable::Missing(_)) => {}
            Err(problem) => {
                // exec goes on to the next directory too; report the first
                // problem only if nothing later works.
                if first_problem.is_none() {
                    first_problem = Some((candidate, problem));
                }
            }
        }
    }
    Err(match first_problem {
        Some((candidate, Unrunnable::NotRegular(why))) => {
            Unrunnable::NotRegular(format!("{} in $PATH: {why}", candidate.display()))
        }
        Some((candidate, Unrunnable::NotExecutable(why))) => {
            Unrunnable::NotExecutable(format!("{} in $PATH: {why}", candidate.display()))
        }
        Some((candidate, problem)) => Unrunnable::Other(format!("{} in $PATH: {problem}", candidate.display())),
        None => Unrunnable::Missing(format!("not found in $PATH ({})", search.to_string_lossy())),
    })
}

fn check_file(path: &Path, user: Option<&nix::unistd::User>) -> Result<(), Unrunnable> {
    use nix::unistd::{faccessat, AccessFlags};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Unrunnable::Missing("no such file".into()),
        _ => Unrunnable::Other(format!("cannot look it up: {e}")),
    })?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a fifo"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "something else"
        };
        return Err(Unrunnable::NotRegular(format!("not a regular file but {what}")));
    }
    let describe =
        |m: &std::fs::Metadata| format!("mode {:04o}, owner uid {}, gid {}", m.mode() & 0o7777, m.uid(), m.gid());
    let kernel = faccessat(nix::fcntl::AT_FDCWD, path, AccessFlags::X_OK, nix::fcntl::AtFlags::AT_EACCESS);
    let me = nix::unistd::geteuid();
    match kernel {
        Ok(()) => {}
        Err(nix::errno::Errno::EACCES) => {
            let who = match nix::unistd::User::from_uid(me) {
                Ok(Some(u)) => format!("user {} (uid {me})", u.name),
                _ => format!("uid {me}"),
            };
            let why = if meta.mode() & 0o111 == 0 {
                format!("not executable by anyone: {}", describe(&meta))
            } else if user.is_none() && !mode_allows_exec(&meta, me.as_raw(), nix::unistd::getegid().as_raw()) {
                format!("not executable by {who}: {}", describe(&meta))
            } else {
                format!("{} allows it, yet the kernel refuses to execute it (a noexec mount?)", describe(&meta))
            };
            return Err(Unrunnable::NotExecutable(why));
        }
        Err(e) => return Err(Unrunnable::Other(format!("cannot check it: {e}"))),
    }
    let Some(user) = user else { return Ok(()) };
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let who = format!("user {} (uid {uid}, gid {gid})", user.name);
    if !mode_allows_exec(&meta, uid, gid) {
        return Err(Unrunnable::NotExecutable(format!("not executable by {who}: {}", describe(&meta))));
    }
    // exec also needs search permission on every directory on the way.
    let real = std::fs::canonicalize(path).map_err(|e| Unrunnable::Other(format!("cannot resolve it: {e}")))?;
    for dir in real.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(dir) else { continue };
        if !mode_allows_exec(&m, uid, gid) {
            return Err(Unrunnable::NotExecutable(format!(
                "directory {} is not searchable by {who}: {}",
                dir.display(),
                describe(&m)
            )));
        }
    }
    Ok(())
}

/// Whether the mode bits let `uid` with primary group `gid` (and no other
/// group) execute a file or search a directory.
fn mode_allows_exec(meta: &std::fs::Metadata, uid: u32, gid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        // Root may search any directory, and execute a file with any x bit.
        return meta.is_dir() || meta.mode() & 0o111 != 0;
    }
    let shift = if meta.uid() == uid {
        6
    } else if meta.gid() == gid {
        3
    } else {
        0
    };
    (meta.mode() >> shift) & 0o1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("takeoverd-worker-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn a_bare_name_is_looked_up_in_path_as_exec_does() {
        assert_eq!(check_runnable(Path::new("sh"), None), Ok(()));
        assert!(matches!(check_runnable(Path::new("no-such-worker-anywhere"), None), Err(Unrunnable::Missing(_))));
    }

    #[test]
    fn mode_bits_decide_for_another_user() {
        let dir = temp_dir("mode");
        let file = dir.join("w");
        std::fs::write(&file, "").unwrap();
        if nix::unistd::geteuid().is_root() {
            // Root's own rules are tested below; give the file an owner the
            // class rules apply to.
            std::os::unix::fs::chown(&file, Some(4242), Some(4243)).unwrap();
        }
        let meta = |mode: u32| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(&file).unwrap()
        };
        use std::os::unix::fs::MetadataExt;
        let (owner, group) = (meta(0o600).uid(), meta(0o600).gid());
        let stranger = owner.wrapping_add(12345);
        assert!(mode_allows_exec(&meta(0o700), owner, group));
        assert!(!mode_allows_exec(&meta(0o070), owner, group), "the owner class decides for the owner");
        assert!(mode_allows_exec(&meta(0o010), stranger, group));
        assert!(!mode_allows_exec(&meta(0o701), stranger, group), "the group class decides for the group");
        assert!(mode_allows_exec(&meta(0o001), stranger, group.wrapping_add(1)));
        assert!(!mode_allows_exec(&meta(0o770), stranger, group.wrapping_add(1)));
        assert!(mode_allows_exec(&meta(0o100), 0, 0), "root needs one x bit");
        assert!(!mode_allows_exec(&meta(0o666), 0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_user_needs_to_search_every_directory_above() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (--worker-user)");
            return;
        }
        let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
            eprintln!("SKIP: no user nobody");
            return;
        };
        let dir = temp_dir("search");
        let private = dir.join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = private.join("w");
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_runnable(&file, None), Ok(()));
        match check_runnable(&file, Some(&nobody)) {
            Err(Unrunnable::NotExecutable(why)) => assert!(why.contains("is not searchable by user nobody"), "{why}"),
            other => panic!("{other:?}"),
        }
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(check_runnable(&file, Some(&nobody)), Ok(()));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(matches!(check_runnable(&file, Some(&nobody)), Err(Unrunnable::NotExecutable(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
