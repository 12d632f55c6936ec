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
//!   its environment.
#![allow(missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{bin_dir, wait_timeout};

/// The systemd binary a user manager runs.
pub const SYSTEMD: &str = "/lib/systemd/systemd";

/// The empty target the manager starts instead of `default.target`, so that
/// the distribution's user units (dbus.socket, gpg-agent sockets...) stay off.
const BOOT_TARGET: &str = "takeover-test.target";

/// Serialises managers within one test binary.
static ONE_MANAGER: Mutex<()> = Mutex::new(());

/// Why the systemd tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
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

/// Whether the systemd tests must run: `CI=true` turns a skip into a failure.
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
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
    pub fn new(tag: &str) -> RunDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = run_base().join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
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
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        RunDir(p)
    }
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

/// Where the systemd tests keep their directories: under the cargo target
/// dir, unless that is under /tmp or /var/tmp. There the service would not
/// see them: the unit's `PrivateTmp=` (which `DynamicUser=` implies, so it
/// cannot be switched off) gives it a /tmp of its own. Then
/// /var/lib/takeover-tests is used instead (the tests run as root; under
/// /run the service could not execute its binaries: 203/EXEC).
pub fn run_base() -> PathBuf {
    let target = bin_dir();
    if under_tmp(&target) {
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
    /// Starts a manager, or returns `None` after printing why the systemd
    /// tests are skipped here. With `CI=true` a skip is a failure (panic).
    pub fn start(tag: &str) -> Option<UserManager> {
        if let Some(why) = unavailable() {
            if required() {
                panic!("the systemd tests cannot run: {why} (CI=true: failing rather than skipping)");
            }
            eprintln!("SKIPPED (systemd tests): {why}");
            return None;
        }
        let one = ONE_MANAGER.lock().unwrap_or_else(|e| e.into_inner());
        let dir = RunDir::new(&format!("systemd-{tag}"));
        let runtime_dir = dir.path("runtime");
        let config_dir = dir.path("config");
        // 0711: systemd wants it private, the DynamicUser= service must pass
        // through it to reach the notify socket and its RuntimeDirectory=.
        std::fs::create_dir(&runtime_dir).unwrap();
        std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        let unit_dir = config_dir.join("systemd/user");
        std::fs::create_dir_all(&unit_dir).unwrap();
        std::fs::write(
            unit_dir.join(BOOT_TARGET),
            "[Unit]\nDescription=Empty start target of the takeover test manager\n",
        )
        .unwrap();
        let inaccessible = dir.path("inaccessible");
        make_inaccessible_nodes(&inaccessible);

        // A cgroup of its own, so that this manager's `app.slice/<unit>`
        // cannot meet another manager's (one started by hand, or by another
        // test binary) and `Drop` can find every process it started.
        let cgroup = dir.0.file_name().unwrap().to_string_lossy().into_owned();
        const SCRIPT: &str = r#"set -e
for h in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd /sys/fs/cgroup; do
    if [ -f "$h/cgroup.procs" ] && mkdir -p "$h/$4" 2>/dev/null; then echo $$ > "$h/$4/cgroup.procs" || true; fi
done
mkdir -p /run/systemd
mount -t tmpfs -o mode=0755 takeover-test /run/systemd
mkdir -p /run/systemd/system /run/systemd/inaccessible
mount --bind "$1" /run/systemd/inaccessible
exec "$2" --user --unit="$3"
"#;
        let log = std::fs::File::create(dir.path("manager.log")).unwrap();
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", SCRIPT, "takeover-test-manager"])
            .arg(&inaccessible)
            .arg(SYSTEMD)
            .arg(BOOT_TARGET)
            .arg(&cgroup)
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .env("XDG_CONFIG_HOME", &config_dir)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting unshare");
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
        let t0 = Instant::now();
        while !private.exists() {
            if let Some(status) = m.manager.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(m.dir.path("manager.log")).unwrap_or_default();
                m.manager = None;
                panic!("the systemd user manager exited at start ({status}):\n{log}");
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "systemd --user did not create {}", private.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        // A user manager creates its notify socket for its own user (0755);
        // the system manager's /run/systemd/notify is 0777. The units run as
        // a DynamicUser=, whose sd_notify() would get EACCES: open it up as
        // the system manager has it.
        let notify = m.runtime_dir.join("systemd/notify");
        wait_until(Duration::from_secs(10), || notify.exists());
        std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o777)).unwrap();
        eprintln!("note: private systemd --user manager pid {pid}, XDG_RUNTIME_DIR={}", m.runtime_dir.display());
        Some(m)
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

    /// Installs `units/seqnum.socket` and `units/seqnum.service` for this
    /// manager: the binaries of `target/debug`, `port` instead of 1234,
    /// `takeoverd_args` appended to `ExecStart=`, output appended to
    /// `service.log`, and what cannot work here dropped or adapted, each
    /// with a note on stderr. Then `daemon-reload`.
    pub fn install_seqnum(&mut self, port: u16, takeoverd_args: &[&str]) {
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
        let bins = format!("{}/", self.service_bins().display());
        let read = |n: &str| std::fs::read_to_string(units.join(n)).unwrap_or_else(|e| panic!("units/{n}: {e}"));

        let socket = read("seqnum.socket");
        assert!(socket.contains("127.0.0.1:1234"), "units/seqnum.socket no longer listens on 127.0.0.1:1234");
        let socket = socket.replace("127.0.0.1:1234", &format!("127.0.0.1:{port}"));
        self.install_unit("seqnum.socket", &socket);

        let log = self.dir.path("service.log");
        let adapt = self.adaptations();
        if adapt.is_empty() {
            eprintln!("note: every directive of units/seqnum.service is kept as written");
        }
        let mut out = String::new();
        for line in read("seqnum.service").lines() {
            let key = line.split('=').next().unwrap_or_default().trim();
            let mut line = line.replace("/usr/local/bin/", &bins);
            if key == "ExecStart" && !takeoverd_args.is_empty() {
                line = format!("{line} {}", takeoverd_args.join(" "));
            }
            if key == "StandardOutput" || key == "StandardError" {
                line = format!("{key}=append:{}", log.display());
            }
            if let Some((new, why)) = adapt.iter().find(|(k, _, _)| k == key).map(|(_, n, w)| (n, w)) {
                eprintln!("note: {line:?} -> {new:?} in the test manager: {why}");
                line = new.clone();
            }
            out.push_str(&line);
            out.push('\n');
        }
        self.install_unit("seqnum.service", &out);
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// The directives of units/seqnum.service that this manager cannot run
    /// as written: (key, replacement line, why). Tested on systemd 252 as
    /// root in a private mount namespace: every directive of the unit works
    /// there, given the inaccessible nodes and the opened notify socket that
    /// `start` provides; what remains depends on where the checkout is.
    fn adaptations(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let under = |p: &Path, roots: &[&str]| roots.iter().any(|r| p.starts_with(r));
        let ours = [self.service_bins(), self.dir.0.clone()];
        if ours.iter().any(|p| under(p, &["/home", "/root", "/run/user"])) {
            out.push((
                "ProtectHome".to_owned(),
                "ProtectHome=read-only".to_owned(),
                "the binaries or the runtime directory of this test live under a home directory".to_owned(),
            ));
        }
        if ours.iter().any(|p| under(p, &["/tmp", "/var/tmp"])) {
            out.push((
                "PrivateTmp".to_owned(),
                "#PrivateTmp= (dropped)".to_owned(),
                "the binaries or the runtime directory of this test live under /tmp or /var/tmp".to_owned(),
            ));
        }
        // Escape hatch for hosts where more fails: TAKEOVER_SYSTEMD_DROP=Key,Key
        if let Ok(keys) = std::env::var("TAKEOVER_SYSTEMD_DROP") {
            for k in keys.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                out.push((k.to_owned(), format!("#{k}= (dropped)"), "listed in TAKEOVER_SYSTEMD_DROP".to_owned()));
            }
        }
        out
    }

    /// Runs `systemctl --user ARGS` against this manager.
    pub fn systemctl(&self, args: &[&str]) -> Output {
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
        let status = wait_timeout(&mut child, Duration::from_secs(120))
            .unwrap_or_else(|| panic!("systemctl --user {args:?} hung for 120 s"));
        Output { status, stdout: ro.join().unwrap(), stderr: re.join().unwrap() }
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
        let t0 = Instant::now();
        loop {
            let state = self.show(unit, "ActiveState");
            let sub = self.show(unit, "SubState");
            let pid = self.main_pid(unit);
            if state == "active" && sub == "running" && pid != 0 && pid != not_pid {
                return pid;
            }
            assert!(
                t0.elapsed() < timeout,
                "{unit} is {state}/{sub} (main pid {pid}) after {timeout:?}\n--- status ---\n{}\n--- service.log (tail) ---\n{}",
                String::from_utf8_lossy(&self.systemctl(&["status", unit]).stdout),
                self.service_log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The control socket of takeoverd in `seqnum.service`:
    /// `RuntimeDirectory=seqnum` lives in `$XDG_RUNTIME_DIR` under a user
    /// manager.
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("seqnum/control.sock")
    }

    /// `takeoverd ctl --control-socket <ours> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(crate::bin("takeoverd"))
            .arg("ctl")
            .arg("--control-socket")
            .arg(self.control_socket())
            .args(args)
            .output()
            .expect("running takeoverd ctl")
    }

    /// `takeoverd ctl status --json`, parsed.
    pub fn ctl_status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "takeoverd ctl status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("ctl status printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
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

    /// Pids of processes that carry this manager's runtime directory in
    /// their environment: the manager and everything it started.
    pub fn processes(&self) -> Vec<u32> {
        let needle = format!("XDG_RUNTIME_DIR={}", self.runtime_dir.display());
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
                    .unwrap_or(false)
            })
            .filter(|pid| crate::alive(*pid))
            .collect()
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if !self.units.is_empty() {
            let mut args = vec!["stop"];
            args.extend(self.units.iter().filter(|u| u.as_str() != BOOT_TARGET).map(String::as_str));
            let out = self.systemctl(&args);
            if !out.status.success() {
                eprintln!("cleanup: systemctl --user {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        if let Some(mut child) = self.manager.take() {
            // SIGTERM makes a user manager stop every unit and exit.
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(15)).is_none() {
                eprintln!("cleanup: the user manager {} ignored SIGTERM for 15 s; killed", self.pid);
            }
        }
        // Anything left (the manager was killed, or a unit escaped): kill it.
        for _ in 0..50 {
            let mut left = self.processes();
            for pid in self.cgroup_procs() {
                if !left.contains(&pid) {
                    left.push(pid);
                }
            }
            if left.is_empty() {
                break;
            }
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
            eprintln!("cleanup: killed stray processes of the test manager: {left:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        for root in self.cgroup_roots() {
            remove_cgroup_tree(&root);
        }
    }
}

impl UserManager {
    /// This manager's cgroup in every hierarchy it was put in.
    fn cgroup_roots(&self) -> Vec<PathBuf> {
        ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"]
            .iter()
            .map(|h| Path::new(h).join(&self.cgroup))
            .filter(|p| p.join("cgroup.procs").is_file())
            .collect()
    }

    /// Every process in this manager's cgroup tree.
    pub fn cgroup_procs(&self) -> Vec<u32> {
        fn walk(dir: &Path, out: &mut Vec<u32>) {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for root in self.cgroup_roots() {
            walk(&root, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|p| crate::alive(*p));
        out
    }
}

/// Removes an (empty) cgroup and its children, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The nodes systemd mounts over the paths it hides (`InaccessiblePaths=`,
/// `ProtectHome=`, `ProtectKernelLogs=`, ...), as PID 1 creates them in
/// `/run/systemd/inaccessible`: one per file type, mode 0000.
fn make_inaccessible_nodes(dir: &Path) {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    std::fs::create_dir(dir).unwrap();
    std::fs::create_dir(dir.join("dir")).unwrap();
    std::fs::write(dir.join("reg"), b"").unwrap();
    mknod(&dir.join("chr"), SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).expect("mknod chr");
    mknod(&dir.join("blk"), SFlag::S_IFBLK, Mode::empty(), makedev(0, 0)).expect("mknod blk");
    nix::unistd::mkfifo(&dir.join("fifo"), Mode::empty()).expect("mkfifo");
    drop(std::os::unix::net::UnixListener::bind(dir.join("sock")).expect("binding the inaccessible socket"));
    for n in ["dir", "reg", "chr", "blk", "fifo", "sock"] {
        std::fs::set_permissions(dir.join(n), std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
}

/// Polls `cond` every 20 ms until it holds; false after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
