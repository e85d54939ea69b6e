//! Starting, driving and stopping a real `writecache_tgt`.
//!
//! Every [`Target`] gets its own directory under `std::env::temp_dir()`, so
//! its socket (`<dir>/spdk.sock`) and lock file never collide with another
//! test running in parallel. The process is killed when the `Target` is
//! dropped, whatever happened to the test.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a target gets to start answering `rpc_get_methods`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a target gets to exit after a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Wall-clock bound for one `spdk-rpc` run.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The workspace root (this package is `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `<root>/scripts`, where the `writecache_rpc` plugin lives.
pub fn scripts_dir() -> PathBuf {
    workspace_root().join("scripts")
}

fn find_in_path(exe: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(exe))
        .find(|p| p.is_file())
}

/// Whether the tests can run: `spdk-rpc` must be on `PATH`. When it is not,
/// prints `SKIP: spdk-rpc not installed` and returns false, unless
/// `WC_REQUIRE_SPDK_RPC=1`, which turns the absence into a failure.
pub fn have_spdk_rpc() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| find_in_path("spdk-rpc").is_some());
    if !found {
        if std::env::var("WC_REQUIRE_SPDK_RPC").as_deref() == Ok("1") {
            panic!(
                "spdk-rpc is not on PATH but WC_REQUIRE_SPDK_RPC=1 \
                 (install it with `pip install spdk==26.9`)"
            );
        }
        println!("SKIP: spdk-rpc not installed");
    }
    found
}

/// Skips the calling test (returns from it) when `spdk-rpc` is missing.
#[macro_export]
macro_rules! require_spdk_rpc {
    () => {
        if !$crate::harness::have_spdk_rpc() {
            return;
        }
    };
}

/// The `writecache_tgt` binary: `$WRITECACHE_TGT`, else
/// `<target>/<profile>/writecache_tgt` next to this test executable
/// (`<target>/<profile>/deps/<test>`). Builds it once if it is missing.
pub fn tgt_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("WRITECACHE_TGT", "writecache_tgt", "writecache-tgt"))
        .clone()
}

/// A binary of the workspace: `$<env>` if set, else `<target>/<profile>/
/// <name>` next to this test executable, built from `package` if missing.
pub fn workspace_binary(env: &str, name: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf();
    let bin = profile_dir.join(name);
    if !bin.is_file() {
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "-p", package, "--bin", name])
            .env("CARGO_TARGET_DIR", target_dir);
        if profile_dir.file_name() == Some(OsStr::new("release")) {
            cmd.arg("--release");
        }
        eprintln!("building {name}: {cmd:?}");
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build -p {package} failed: {st}");
    }
    assert!(
        bin.is_file(),
        "{} is missing after building it",
        bin.display()
    );
    bin
}

/// A fresh, empty directory under the system temp dir.
pub fn unique_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Short: a Unix socket path must fit in 108 bytes.
    let tag: String = tag.chars().take(12).collect();
    let d = std::env::temp_dir().join(format!("wcit-{}-{n}-{nanos:x}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Output of a finished command.
#[derive(Debug, Clone)]
pub struct Out {
    /// Exit code (`-1` if killed by a signal or by the timeout).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// stdout and stderr together (for `contains` checks and messages).
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` with stdout/stderr captured, killing it after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Out {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let reader = |s: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut s) = s {
                let _ = s.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = wait_timeout(&mut child, timeout);
    let timed_out = status.is_none();
    if timed_out {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    assert!(
        !timed_out,
        "{cmd:?} did not finish within {timeout:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    Out {
        code: status.and_then(|s| s.code()).unwrap_or(-1),
        stdout,
        stderr,
    }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("wait for child: {e}"),
        }
    }
}

/// An `spdk-rpc` command line (global options first, as the client wants),
/// with `PYTHONPATH` pointing at our plugin.
pub fn spdk_rpc_cmd(global: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new("spdk-rpc");
    let mut pp = scripts_dir().into_os_string();
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        pp.push(":");
        pp.push(old);
    }
    cmd.env("PYTHONPATH", pp).args(global).args(args);
    cmd
}

/// Runs `spdk-rpc` with no server (for `--help` and `--dry-run`).
pub fn spdk_rpc_offline(global: &[&str], args: &[&str]) -> Out {
    run_bounded(spdk_rpc_cmd(global, args), RPC_TIMEOUT)
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    let pid = i32::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill() has no memory-safety preconditions; `pid` is our child.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// A running `writecache_tgt`.
pub struct Target {
    child: Option<Child>,
    /// Private directory: socket, logs, config files.
    pub dir: PathBuf,
    /// RPC socket path.
    pub sock: PathBuf,
    log: PathBuf,
    keep_dir: bool,
}

impl Target {
    /// The standard flags every test target runs with (plus `-r <sock>`).
    pub const BASE_ARGS: [&'static str; 4] = ["--interrupt-mode", "--no-pin", "-m", "0x1"];

    /// Starts a target with `extra` flags and waits until `spdk-rpc
    /// rpc_get_methods` succeeds.
    pub fn start(tag: &str, extra: &[&str]) -> Target {
        let mut t = Target::spawn(tag, extra);
        t.wait_ready();
        t
    }

    /// Starts a target without waiting for it (for start-up failures).
    pub fn spawn(tag: &str, extra: &[&str]) -> Target {
        Target::spawn_in(unique_dir(tag), extra)
    }

    /// Starts a target whose files live in `dir` (so a test can put a
    /// config there first).
    pub fn spawn_in(dir: PathBuf, extra: &[&str]) -> Target {
        let sock = dir.join("spdk.sock");
        Target::spawn_at(dir, sock, extra)
    }

    /// Starts a target with files in `dir` listening on `sock`.
    pub fn spawn_at(dir: PathBuf, sock: PathBuf, extra: &[&str]) -> Target {
        let log = dir.join("tgt.log");
        let logf = File::create(&log).expect("create log");
        let mut cmd = Command::new(tgt_binary());
        cmd.args(Target::BASE_ARGS)
            .arg("-r")
            .arg(&sock)
            .args(extra)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Target {
            child: Some(child),
            dir,
            sock,
            log,
            keep_dir: false,
        }
    }

    /// Fresh private directory for a target that will be started later
    /// with [`Target::spawn_in`].
    pub fn new_dir(tag: &str) -> PathBuf {
        unique_dir(tag)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("target running").id()
    }

    /// The `.lock` file next to the socket.
    pub fn lock_path(&self) -> PathBuf {
        let mut s = self.sock.clone().into_os_string();
        s.push(".lock");
        PathBuf::from(s)
    }

    /// Everything the target printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (≤ [`READY_TIMEOUT`]) until `spdk-rpc -t 1 rpc_get_methods`
    /// succeeds, as SPDK's `waitforlisten` does.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = self.try_exit_status() {
                panic!(
                    "writecache_tgt exited during start-up ({st}):\n{}",
                    self.log()
                );
            }
            if self.sock.exists() {
                let out = run_bounded(
                    spdk_rpc_cmd(&["-s", self.sock_str(), "-t", "1"], &["rpc_get_methods"]),
                    RPC_TIMEOUT,
                );
                if out.code == 0 {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "writecache_tgt did not answer rpc_get_methods within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket path as `&str` (always UTF-8: we made it).
    pub fn sock_str(&self) -> &str {
        self.sock.to_str().expect("utf-8 socket path")
    }

    /// Runs `spdk-rpc -s SOCK -t 10 <args>` (plugin importable) and returns
    /// its exit code and output.
    pub fn rpc(&self, args: &[&str]) -> Out {
        self.rpc_with(&[], args)
    }

    /// Like [`Target::rpc`] with extra global options (e.g. `--plugin X`).
    pub fn rpc_with(&self, global: &[&str], args: &[&str]) -> Out {
        let mut g = vec!["-s", self.sock_str(), "-t", "10"];
        g.extend_from_slice(global);
        run_bounded(spdk_rpc_cmd(&g, args), RPC_TIMEOUT)
    }

    /// [`Target::rpc`] that must succeed; returns stdout.
    pub fn rpc_ok(&self, args: &[&str]) -> String {
        let out = self.rpc(args);
        assert_eq!(
            out.code,
            0,
            "spdk-rpc {args:?} failed: {}\n--- target log ---\n{}",
            out.all(),
            self.log()
        );
        out.stdout
    }

    /// [`Target::rpc_ok`], stdout parsed as JSON.
    pub fn rpc_json(&self, args: &[&str]) -> Value {
        let s = self.rpc_ok(args);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {s}"))
    }

    /// [`Target::rpc`] that must fail with exit code 1 (an RPC error);
    /// returns everything it printed.
    pub fn rpc_err(&self, args: &[&str]) -> String {
        let out = self.rpc(args);
        assert_eq!(out.code, 1, "spdk-rpc {args:?} should fail: {out:?}");
        out.all()
    }

    /// A raw connection to the socket (our blocking client), 10 s timeout.
    pub fn client(&self) -> wc_rpc::client::Client {
        let c = wc_rpc::client::Client::connect(&self.sock)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.sock.display()));
        c.set_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        c
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    /// Waits (≤ `timeout`) for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("target was started");
        match wait_timeout(child, timeout) {
            Some(st) => st,
            None => panic!(
                "writecache_tgt still running after {timeout:?}:\n{}",
                self.log()
            ),
        }
    }

    /// Asserts that the process exited with status 0 and removed its
    /// socket and lock file; then cleans up its directory.
    pub fn assert_clean_exit(mut self, st: ExitStatus) {
        assert_eq!(
            st.code(),
            Some(0),
            "writecache_tgt exit status {st}:\n{}",
            self.log()
        );
        assert!(
            !self.sock.exists(),
            "socket {} left behind",
            self.sock.display()
        );
        assert!(
            !self.lock_path().exists(),
            "lock file {} left behind",
            self.lock_path().display()
        );
        self.child = None;
    }

    /// Sends `sig` and waits for a clean exit (status 0, socket and lock gone).
    pub fn stop_with(mut self, sig: i32) {
        signal(self.pid(), sig);
        let st = self.wait_exit(EXIT_TIMEOUT);
        self.assert_clean_exit(st);
    }

    /// [`Target::stop_with`] SIGTERM.
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Keeps the directory after the test (for post-mortems).
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- writecache_tgt log ({}) ---\n{}",
                self.log.display(),
                self.log()
            );
            return;
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Names of all bdevs in a `bdev_get_bdevs` result.
pub fn bdev_names(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("bdev_get_bdevs returns an array")
        .iter()
        .map(|b| b["name"].as_str().expect("name is a string").to_string())
        .collect()
}

/// Whether the client `exe` is installed; prints why a test is skipped, or
/// fails when `WC_REQUIRE_SPDK_RPC=1` (scripts/test.sh installs every client).
pub fn have(exe: &str) -> bool {
    if find_in_path(exe).is_some() {
        return true;
    }
    if std::env::var("WC_REQUIRE_SPDK_RPC").as_deref() == Ok("1") {
        panic!("{exe} is not on PATH but WC_REQUIRE_SPDK_RPC=1 (scripts/deps.sh installs it)");
    }
    println!("SKIP: {exe} not installed (scripts/deps.sh installs it)");
    false
}

/// Skips the calling test (returns from it) when a client binary is missing.
#[macro_export]
macro_rules! require_clients {
    ($($exe:expr),*) => {
        $(if !$crate::harness::have($exe) { return; })*
    };
}
