//! The Unix socket a giver listens on for takers: created mode 0600, a stale
//! one replaced, a live one never stolen, and peers checked by credentials.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::unistd::{geteuid, Uid};

use crate::error::{Error, Result};

/// A listening takeover endpoint.
#[derive(Debug)]
pub struct Endpoint {
    fd: OwnedFd,
    path: PathBuf,
    /// Inode of the socket file we created, so we only ever remove our own.
    ino: u64,
}

/// How to treat a socket file already at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it only if no process listens on it (a stale file).
    ReplaceStale,
    /// Replace it even if it is live: we are the successor of whoever
    /// listens there, having just taken its sockets.
    Succeed,
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
        .map_err(|e| Error::io("creating a unix socket", e))
}

/// Connects to a takeover endpoint (the taker's side).
pub fn connect(path: &Path) -> Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| Error::io("creating a unix socket", e))?;
    let (addr, _dir) = unix_addr(path)?;
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| Error::Io {
        context: "connecting",
        source: io::Error::new(io::Error::from(e).kind(), format!("{}: {}", path.display(), e.desc())),
    })?;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| Error::io("fcntl", e))?;
    Ok(fd)
}

/// The socket address of `path`. A path too long for `sun_path` (108
/// bytes) is reached through its directory: `/proc/self/fd/N/NAME`, with N
/// an `O_PATH` fd of the directory, returned so it stays open until the
/// bind or connect is done.
fn unix_addr(path: &Path) -> Result<(UnixAddr, Option<OwnedFd>)> {
    const SUN_PATH: usize = 107;
    if path.as_os_str().len() <= SUN_PATH {
        return Ok((UnixAddr::new(path).map_err(|e| Error::io("unix socket path", e))?, None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::io("unix socket path", io::Error::from(io::ErrorKind::InvalidInput)));
    };
    let dir = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| Error::Io {
        context: "opening the socket's directory",
        source: io::Error::new(io::Error::from(e).kind(), format!("{}: {}", dir.display(), e.desc())),
    })?;
    let short = Path::new("/proc/self/fd").join(std::os::fd::AsRawFd::as_raw_fd(&dir).to_string()).join(name);
    let addr = UnixAddr::new(&short).map_err(|e| Error::io("unix socket path (even through /proc/self/fd)", e))?;
    Ok((addr, Some(dir)))
}

impl Endpoint {
    /// Listens on `path`. The socket file is created under a temporary name,
    /// made mode 0600, and renamed into place, so it is never reachable
    /// with wider permissions and the switch is atomic.
    pub fn bind(path: &Path, existing: Existing) -> Result<Endpoint> {
        if existing == Existing::ReplaceStale && path.exists() {
            match connect(path) {
                Ok(_) => {
                    return Err(Error::Io {
                        context: "binding the takeover path",
                        source: io::Error::new(io::ErrorKind::AddrInUse, format!("{}: a live process is offering takeover there; take over from it with -T, or pick another path", path.display())),
                    })
                }
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale takeover socket left by a dead process");
                }
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let fd = seqpacket()?;
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("takeover"),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let (addr, _dir) = unix_addr(&tmp)?;
        socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| Error::Io {
            context: "binding the takeover path",
            source: io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", tmp.display())),
        })?;
        let placed = (|| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, path)?;
            std::fs::symlink_metadata(path).map(|m| m.ino())
        })();
        let ino = match placed {
            Ok(ino) => ino,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Io {
                    context: "placing the takeover socket",
                    source: io::Error::new(e.kind(), format!("{}: {e}", path.display())),
                });
            }
        };
        socket::listen(&fd, socket::Backlog::new(64).expect("64 is a valid backlog"))
            .map_err(|e| Error::io("listen on the takeover path", e))?;
        Ok(Endpoint { fd, path: path.to_owned(), ino })
    }

    /// The path we listen on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An endpoint this process already listens on, carried across an
    /// `execve` (a supervisor that re-executes itself keeps its control
    /// socket, so that clients never find it missing): `fd` must be a
    /// listening `SOCK_SEQPACKET` Unix socket, and `path` the socket file it
    /// is bound to (its inode is kept, so that only our own file is ever
    /// removed). On error `fd` is closed.
    pub fn inherit(fd: OwnedFd, path: &Path) -> Result<Endpoint> {
        let name = path.display().to_string();
        crate::fd::validate(fd.as_fd(), crate::Kind::UnixSeqpacket)
            .map_err(|problem| Error::BadFd { name: name.clone(), problem })?;
        if !socket::getsockopt(&fd, sockopt::AcceptConn).map_err(|e| Error::io("SO_ACCEPTCONN", e))? {
            let problem = crate::fd::FdError::WrongSocket {
                expected: crate::Kind::UnixSeqpacket,
                domain: libc::AF_UNIX,
                ty: libc::SOCK_SEQPACKET,
                listening: Some(false),
            };
            return Err(Error::BadFd { name, problem });
        }
        let ino = std::fs::symlink_metadata(path).map(|m| m.ino()).map_err(|e| Error::Io {
            context: "finding the inherited socket's file",
            source: io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        })?;
        Ok(Endpoint { fd, path: path.to_owned(), ino })
    }

    /// Gives up the endpoint without removing its file: its fd (to carry
    /// across an `execve`, see [`inherit`](Self::inherit)).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Accepts one taker, if one is waiting, and checks its credentials:
    /// only root and our own uid may take our sockets. A refused peer's
    /// pid and uid are in the error.
    pub fn accept(&self) -> Result<Option<OwnedFd>> {
        let raw = match socket::accept4(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            Ok(raw) => raw,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ECONNABORTED | nix::errno::Errno::EINTR) => {
                return Ok(None)
            }
            Err(e) => return Err(Error::io("accept on the takeover path", e)),
        };
        // SAFETY: accept4 just created this fd for us; nothing else owns it.
        let conn = unsafe { crate::sys::own(raw) };
        check_peer(conn.as_fd())?;
        Ok(Some(conn))
    }

    /// Removes the socket file if it is still ours (a successor may have
    /// replaced it already).
    pub fn unlink_if_ours(&self) {
        if std::fs::symlink_metadata(&self.path).map(|m| m.ino()).ok() == Some(self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl AsFd for Endpoint {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Checks the peer of a connected Unix socket: root or our effective uid.
pub fn check_peer(fd: BorrowedFd<'_>) -> Result<()> {
    let cred = socket::getsockopt(&fd, sockopt::PeerCredentials).map_err(|e| Error::io("SO_PEERCRED", e))?;
    let uid = Uid::from_raw(cred.uid());
    if uid.is_root() || uid == geteuid() {
        Ok(())
    } else {
        Err(Error::PeerNotAllowed { pid: cred.pid(), uid: cred.uid() })
    }
}
