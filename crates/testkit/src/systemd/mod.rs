//! A real, private `systemd --user` manager for the end-to-end tests, so that
//! `units/seqnum.{socket,service}` run under systemd itself: socket
//! activation, `Type=notify`, the fd store, `ExecReload=`, `Restart=`.
//!
//! How it works (see docs/SYSTEMD.md and /work/shared/SYSTEMD.md):
//! - As root, `unshare -m --propagation private sh -c SCRIPT` enters a private
//!   mount namespace. There the script mounts a tmpfs on `/run/systemd`,
//!   creates `/run/systemd/system` (the "booted with systemd" marker that
//!   `systemd --user` insists on) and bind-mounts the `inaccessible/` nodes
//!   the sandboxing directives need (`ProtectHome=`, `ProtectKernelLogs=`,
//!   `ProtectKernelTunables=` mount them over what they hide, and a manager
//!   running as root looks for them in `/run/systemd/inaccessible`). Then it
//!   `exec`s `/lib/systemd/systemd --user`, so the child's pid is the
//!   manager's. The host's `/run/systemd` is never touched.
//! - `XDG_RUNTIME_DIR` and `XDG_CONFIG_HOME` point into a fresh directory
//!   under the cargo target dir (not under /tmp: the units' `PrivateTmp=`
//!   would hide the manager's notify socket from the service). The manager's
//!   private bus, `$XDG_RUNTIME_DIR/systemd/private`, is a plain file there,
//!   so `systemctl --user` run from the test process (host namespace) reaches
//!   it.
//! - Units are generated from `units/*` with the binaries of `target/debug`,
//!   the test's port, output appended to `service.log` (there is no journal),
//!   and every directive that cannot work here dropped with a printed note.
//! - Only one manager runs at a time (a static lock): a manager that thinks
//!   it owns the cgroup root puts every unit in `/app.slice/<unit>`, so two
//!   of them would share cgroups.
//! - `Drop` stops the units, stops the manager (SIGTERM, then SIGKILL), and
//!   kills anything that still carries this manager's runtime directory in
//!   its environment or sits in its cgroup (`cleanup.rs`).
//! - On a host booted with systemd, a private manager with its own
//!   `XDG_RUNTIME_DIR` does not disturb the user's own: there is no private
//!   mount namespace to enter, and seqnum-bench (which does not need the
//!   shipped units' `DynamicUser=`) runs one without root.
//!
//! The tests use [`UserManager::start`], which prints `SKIP: <test>: <why>`
//! when systemd cannot run here (a failure under `CI=true`); seqnum-bench
//! uses [`UserManager::start_in`], which returns why instead.

mod cleanup;
mod units;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::bins::bin_dir;
use crate::wait::{poll_until, wait_timeout};

/// The systemd binary a user manager runs.
pub const SYSTEMD: &str = "/lib/systemd/systemd";

/// The empty target the manager starts instead of `default.target`, so that
/// the distribution's user units (dbus.socket, gpg-agent sockets...) stay off.
const BOOT_TARGET: &str = "takeover-test.target";

/// Serialises managers within one test binary.
static ONE_MANAGER: Mutex<()> = Mutex::new(());

/// Whether this host was booted with systemd (then `systemd --user` runs
/// as it is, without a private mount namespace).
fn host_booted_with_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Why a private manager cannot run here, if it cannot. `as_root`: the
/// caller needs one running as root (the shipped units' `DynamicUser=`);
/// otherwise root is needed only for the private mount namespace of a host
/// not booted with systemd.
pub fn unavailable(as_root: bool) -> Option<String> {
    let root = nix::unistd::geteuid().is_root();
    if as_root && !root {
        return Some("not root: the shipped units run as a DynamicUser= under a manager running as root".into());
    }
    if !root && !host_booted_with_systemd() {
        return Some("not root: a private systemd user manager needs a private mount namespace".into());
    }
    if !Path::new(SYSTEMD).exists() {
        return Some(format!("{SYSTEMD} does not exist (systemd is not installed)"));
    }
    for tool in ["unshare", "systemctl", "mount"] {
        if which(tool).is_none() {
            return Some(format!("`{tool}` is not in PATH"));
        }
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// A directory for one manager, under the target dir, removed on drop
/// (kept, with its path printed, when the test failed or
/// `TAKEOVER_KEEP_TEST_DIRS` is set).
#[derive(Debug)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// Creates `<base>/<tag>-<pid>-<n>`, mode 0755.
    pub fn new_in(base: &Path, tag: &str) -> std::io::Result<RunDir> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = base.join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        // The service runs as a DynamicUser=: it must be able to traverse
        // every directory down to its runtime directory and its binaries.
        let mut up = Some(p.as_path());
        while let Some(d) = up {
            if d == Path::new("/") {
                break;
            }
            if let Ok(m) = std::fs::metadata(d) {
                if m.permissions().mode() & 0o001 == 0 {
                    eprintln!(
                        "note: {} is not world-searchable; the DynamicUser= service may not reach it",
                        d.display()
                    );
                }
            }
            up = d.parent();
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(RunDir(p))
    }

    /// A path inside the dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("TAKEOVER_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {} for inspection (service.log, manager.log)", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
            // The parent too, once the last test is done with it.
            if let Some(parent) = self.0.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// The longest `XDG_RUNTIME_DIR` a manager can use. A Unix socket's path
/// (`sun_path`) holds 107 bytes and a NUL; the longest socket under it is the
/// service's control socket, `seqnum/control.sock` (20 bytes with its
/// slash); the manager's own `systemd/private` is 16. Past 91 bytes
/// `systemd --user` 252 exits with status 1 and prints nothing (measured),
/// which is why [`UserManager::start_in`] checks before it starts one.
pub const RUNTIME_DIR_MAX: usize = 107 - "/seqnum/control.sock".len();

/// The longest base [`run_base`] keeps under the target dir: room for the
/// longest test's `systemd-<tag>-<pid>-<n>/runtime` (a 25-byte tag, a
/// 7-digit pid) within [`RUNTIME_DIR_MAX`].
const RUN_BASE_MAX: usize = 32;

/// Where the systemd tests keep their directories: under the cargo target
/// dir, unless that is under /tmp or /var/tmp. There the service would not
/// see them: the unit's `PrivateTmp=` (which `DynamicUser=` implies, so it
/// cannot be switched off) gives it a /tmp of its own. Then
/// /var/lib/takeover-tests is used instead (the tests run as root; under
/// /run the service could not execute its binaries: 203/EXEC).
///
/// A target dir with a long path is not used either: the manager binds its
/// sockets under `XDG_RUNTIME_DIR`, inside the run dir, and a Unix socket's
/// path has at most 107 bytes (see [`RUNTIME_DIR_MAX`]).
pub fn run_base() -> PathBuf {
    let target = bin_dir();
    let in_target = target.join("systemd-tests");
    if under_tmp(&target) || in_target.as_os_str().len() > RUN_BASE_MAX {
        let base = PathBuf::from("/var/lib/takeover-tests");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        base
    } else {
        target.join("systemd-tests")
    }
}

fn under_tmp(p: &Path) -> bool {
    p.starts_with("/tmp") || p.starts_with("/var/tmp")
}

/// A private `systemd --user` manager.
#[derive(Debug)]
pub struct UserManager {
    manager: Option<Child>,
    pid: u32,
    /// The units this test installed (stopped on drop).
    units: Vec<String>,
    pub dir: RunDir,
    pub runtime_dir: PathBuf,
    pub config_dir: PathBuf,
    /// The manager's cgroup, relative to each hierarchy's root.
    cgroup: String,
    _one: MutexGuard<'static, ()>,
}

impl UserManager {
    /// Starts a manager for a test under [`run_base`], or returns `None`
    /// after printing `SKIP: <test>: <why>` when systemd cannot run here.
    /// With `CI=true` a skip is a failure (panic); so is a manager that
    /// does not start.
    pub fn start(tag: &str) -> Option<UserManager> {
        if let Some(why) = unavailable(true) {
            crate::skip(&format!("systemd ({tag}): {why}"));
            return None;
        }
        let tag = format!("systemd-{tag}");
        let m = UserManager::start_in(&run_base(), &tag).or_else(|e| {
            // A manager is the test's scaffolding, not what is tested: one
            // that did not come up is tried once more, with a note.
            eprintln!("note: the private systemd manager did not start ({e}); trying once more");
            UserManager::start_in(&run_base(), &tag)
        });
        Some(m.unwrap_or_else(|e| panic!("{e}")))
    }

    /// Starts a manager with its directory under `base`; the caller has
    /// checked [`unavailable`]. Fails with what the manager said when it
    /// does not come up.
    pub fn start_in(base: &Path, tag: &str) -> Result<UserManager, String> {
        let one = ONE_MANAGER.lock().unwrap_or_else(|e| e.into_inner());
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        let dir = RunDir::new_in(base, tag).map_err(|e| io("creating the manager's directory", e))?;
        let runtime_dir = dir.path("runtime");
        if runtime_dir.as_os_str().len() > RUNTIME_DIR_MAX {
            return Err(format!(
                "XDG_RUNTIME_DIR {} is {} bytes; the sockets under it need it to be at most {RUNTIME_DIR_MAX} \
                 (a Unix socket path holds 107): start the manager under a shorter directory",
                runtime_dir.display(),
                runtime_dir.as_os_str().len()
            ));
        }
        let config_dir = dir.path("config");
        // 0711: systemd wants it private, the DynamicUser= service must pass
        // through it to reach the notify socket and its RuntimeDirectory=.
        std::fs::create_dir(&runtime_dir).map_err(|e| io("creating XDG_RUNTIME_DIR", e))?;
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| io("chmod XDG_RUNTIME_DIR", e))?;
        let unit_dir = config_dir.join("systemd/user");
        std::fs::create_dir_all(&unit_dir).map_err(|e| io("creating the unit directory", e))?;
        std::fs::write(
            unit_dir.join(BOOT_TARGET),
            "[Unit]\nDescription=Empty start target of the takeover test manager\n",
        )
        .map_err(|e| io("writing the start target", e))?;

        // A cgroup of its own, so that this manager's `app.slice/<unit>`
        // cannot meet another manager's (one started by hand, or by another
        // test binary) and `Drop` can find every process it started.
        let cgroup = dir.0.file_name().unwrap().to_string_lossy().into_owned();
        const CGROUP: &str = r#"set -e
for h in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd /sys/fs/cgroup; do
    if [ -f "$h/cgroup.procs" ] && mkdir -p "$h/$4" 2>/dev/null; then echo $$ > "$h/$4/cgroup.procs" || true; fi
done
"#;
        const PRIVATE_RUN: &str = r#"mkdir -p /run/systemd
mount -t tmpfs -o mode=0755 takeover-test /run/systemd
mkdir -p /run/systemd/system /run/systemd/inaccessible
mount --bind "$1" /run/systemd/inaccessible
"#;
        const EXEC: &str = r#"exec "$2" --user --unit="$3""#;
        let inaccessible = dir.path("inaccessible");
        let mut cmd = if host_booted_with_systemd() {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("{CGROUP}{EXEC}"), "takeover-test-manager"]);
            c
        } else {
            make_inaccessible_nodes(&inaccessible).map_err(|e| io("making the inaccessible nodes", e))?;
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "sh", "-c", &format!("{CGROUP}{PRIVATE_RUN}{EXEC}")])
                .arg("takeover-test-manager");
            c
        };
        let log = std::fs::File::create(dir.path("manager.log")).map_err(|e| io("creating manager.log", e))?;
        let child = cmd
            .arg(&inaccessible)
            .arg(SYSTEMD)
            .arg(BOOT_TARGET)
            .arg(&cgroup)
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .env("XDG_CONFIG_HOME", &config_dir)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            // Its own messages into manager.log: with no journald here the
            // default target is the kernel log, and a manager that exits
            // at start would say nothing to the test that started it.
            .env("SYSTEMD_LOG_TARGET", "console")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| io("manager.log", e))?)
            .stderr(log)
            .spawn()
            .map_err(|e| io("starting the manager", e))?;
        let pid = child.id();
        let mut m = UserManager {
            manager: Some(child),
            pid,
            units: Vec::new(),
            dir,
            runtime_dir,
            config_dir,
            cgroup,
            _one: one,
        };
        let private = m.runtime_dir.join("systemd/private");
        let mut exited = None;
        let up = poll_until(&format!("systemd --user creates {}", private.display()), Duration::from_secs(20), || {
            exited = m.manager.as_mut().and_then(|c| c.try_wait().ok().flatten());
            exited.is_some() || private.exists()
        });
        if let Some(status) = exited {
            let log = std::fs::read_to_string(m.dir.path("manager.log")).unwrap_or_default();
            m.manager = None;
            return Err(format!("the systemd user manager exited at start ({status}):\n{log}"));
        }
        up.map_err(|e| e.to_string())?;
        // A user manager creates its notify socket for its own user (0755);
        // the system manager's /run/systemd/notify is 0777. The units run as
        // a DynamicUser=, whose sd_notify() would get EACCES: open it up as
        // the system manager has it.
        let notify = m.runtime_dir.join("systemd/notify");
        poll_until("the manager creates its notify socket", Duration::from_secs(10), || notify.exists())
            .map_err(|e| e.to_string())?;
        std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| io("chmod the notify socket", e))?;
        eprintln!("note: private systemd --user manager pid {pid}, XDG_RUNTIME_DIR={}", m.runtime_dir.display());
        Ok(m)
    }

    /// The manager's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where the units find takeoverd and seqnum-worker: `target/debug`, or a
    /// copy in this test's directory when that is under /tmp (see
    /// [`run_base`]).
    pub fn service_bins(&self) -> PathBuf {
        if !under_tmp(&bin_dir()) {
            return bin_dir();
        }
        let dir = self.dir.path("bin");
        if !dir.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            for b in ["takeoverd", "seqnum-worker"] {
                std::fs::copy(bin_dir().join(b), dir.join(b)).unwrap();
            }
        }
        dir
    }

    /// Writes a unit file and remembers it for the cleanup.
    pub fn install_unit(&mut self, name: &str, text: &str) {
        std::fs::write(self.config_dir.join("systemd/user").join(name), text).unwrap();
        if !self.units.iter().any(|u| u == name) {
            self.units.push(name.to_owned());
        }
    }

    /// Runs `systemctl --user ARGS` against this manager; panics when it
    /// hangs for 120 s.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.systemctl_within(args, Duration::from_secs(120))
            .unwrap_or_else(|| panic!("systemctl --user {args:?} hung for 120 s"))
    }

    /// `systemctl --user ARGS` for a caller that carries on after a
    /// failure: its stdout, or what went wrong.
    pub fn systemctl_checked(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let out = self
            .systemctl_within(args, timeout)
            .ok_or_else(|| format!("systemctl --user {} hung for {timeout:?}", args.join(" ")))?;
        if !out.status.success() {
            return Err(format!(
                "systemctl --user {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Runs `systemctl --user ARGS` against this manager; `None` (and
    /// systemctl killed) when it does not finish within `timeout`.
    pub fn systemctl_within(&self, args: &[&str], timeout: Duration) -> Option<Output> {
        let mut child = Command::new("systemctl")
            .arg("--user")
            .arg("--no-pager")
            .args(args)
            .env("XDG_RUNTIME_DIR", &self.runtime_dir)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running systemctl");
        // Read the pipes on threads so that a chatty command cannot block.
        let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let ro = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = std::io::Read::read_to_end(&mut so, &mut b);
            b
        });
        let re = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = std::io::Read::read_to_end(&mut se, &mut b);
            b
        });
        let status = wait_timeout(&mut child, timeout)?;
        Some(Output { status, stdout: ro.join().unwrap(), stderr: re.join().unwrap() })
    }

    /// `systemctl --user ARGS`, which must succeed; returns its stdout.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl --user {args:?} failed ({}):\n{}{}\n--- service.log (tail) ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.service_log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One property of a unit (`systemctl show -p P --value`).
    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.systemctl_ok(&["show", "-p", prop, "--value", unit]).trim().to_owned()
    }

    /// A numeric property of a unit.
    pub fn show_u64(&self, unit: &str, prop: &str) -> u64 {
        let v = self.show(unit, prop);
        v.parse().unwrap_or_else(|_| panic!("{unit} {prop}={v:?} is not a number"))
    }

    /// The unit's main pid (0 when none).
    pub fn main_pid(&self, unit: &str) -> u32 {
        self.show_u64(unit, "MainPID") as u32
    }

    /// Waits until `unit` is active/running with a main pid other than
    /// `not_pid`; returns that pid.
    pub fn wait_running(&self, unit: &str, not_pid: u32, timeout: Duration) -> u32 {
        let (mut state, mut sub, mut pid) = (String::new(), String::new(), 0);
        let waited = poll_until(&format!("{unit} runs with a main pid other than {not_pid}"), timeout, || {
            (state, sub, pid) = (self.show(unit, "ActiveState"), self.show(unit, "SubState"), self.main_pid(unit));
            state == "active" && sub == "running" && pid != 0 && pid != not_pid
        });
        if let Err(e) = waited {
            panic!(
                "{e}: it is {state}/{sub} (main pid {pid})\n--- status ---\n{}\n--- service.log (tail) ---\n{}",
                String::from_utf8_lossy(&self.systemctl(&["status", unit]).stdout),
                self.service_log_tail(40)
            );
        }
        pid
    }

    /// What the services wrote (`StandardOutput=append:`).
    pub fn service_log(&self) -> String {
        std::fs::read_to_string(self.dir.path("service.log")).unwrap_or_default()
    }

    /// The last `n` lines of the service log.
    pub fn service_log_tail(&self, n: usize) -> String {
        let log = self.service_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The nodes systemd mounts over the paths it hides (`InaccessiblePaths=`,
/// `ProtectHome=`, `ProtectKernelLogs=`, ...), as PID 1 creates them in
/// `/run/systemd/inaccessible`: one per file type, mode 0000.
fn make_inaccessible_nodes(dir: &Path) -> std::io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    std::fs::create_dir(dir)?;
    std::fs::create_dir(dir.join("dir"))?;
    std::fs::write(dir.join("reg"), b"")?;
    mknod(&dir.join("chr"), SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))?;
    mknod(&dir.join("blk"), SFlag::S_IFBLK, Mode::empty(), makedev(0, 0))?;
    nix::unistd::mkfifo(&dir.join("fifo"), Mode::empty())?;
    drop(std::os::unix::net::UnixListener::bind(dir.join("sock"))?);
    for n in ["dir", "reg", "chr", "blk", "fifo", "sock"] {
        std::fs::set_permissions(dir.join(n), std::fs::Permissions::from_mode(0o000))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
}
