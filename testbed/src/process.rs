//! Server processes that cannot outlive the test process.
//!
//! A shared bed lives in a `static` and is never dropped, and a test binary may be
//! SIGKILLed, so Drop alone cannot stop servers. Without `unsafe` (no prctl
//! PDEATHSIG) the reliable signal is a pipe: each server runs under a small bash
//! watchdog whose stdin is a pipe that only this process holds the write end of.
//! When this process exits for any reason the kernel closes that end, the
//! watchdog's `read` sees EOF, and it stops the server (its stop signal, then KILL
//! after a grace period) and removes the server's temp dir. The same pipe carries
//! `stop` / `kill` commands for fault tests, which stop the server but keep its data.
//!
//! Children are spawned with `std::process`, not `tokio::process`, because the
//! `#[tokio::test]` runtime that starts the shared bed dies with its test.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Context, Result, TestbedError};

const WATCHDOG: &str = r#"
sig=$1 ksig=$2 grace=$3 cleanup=$4
shift 4
# Background jobs of a non-interactive shell get stdin from /dev/null anyway; say it
# so the server can never read (and so hold open) the watchdog's pipe.
"$@" </dev/null &
pid=$!
echo "watchdog: started $1 as pid $pid"

stop() {
  kill -"$1" "$pid" 2>/dev/null
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "watchdog: server ignored SIG$1 for ${grace}s, killing it"
    kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid"
  echo "watchdog: server stopped (status $?)"
}

# The owner is gone (EOF, or a signal to the whole process group as on Ctrl-C):
# stop the server and remove its files, unless asked to keep them for debugging.
owner_gone() {
  stop "$sig"
  if [[ -n $cleanup && -z ${OUTBOX_TESTBED_KEEP:-} ]]; then
    rm -rf -- "$cleanup"
  fi
  exit 0
}
trap owner_gone INT TERM HUP

while kill -0 "$pid" 2>/dev/null; do
  if read -r -t 0.5 cmd; then
    case $cmd in
      stop) stop "$sig"; exit 0 ;;
      kill) stop "$ksig"; exit 0 ;;
    esac
  elif (( $? <= 128 )); then
    owner_gone
  fi
done
wait "$pid"
rc=$?
echo "watchdog: server exited by itself (status $rc)"
exit $(( rc == 0 ? 99 : rc ))
"#;

/// How a supervised server is asked to stop.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stop {
    /// The server's own clean-shutdown signal.
    Graceful,
    /// A crash, as far as clients can tell (no clean shutdown, no flush).
    Kill,
}

/// The settings of one supervised server.
pub(crate) struct Spec<'a> {
    pub name: &'static str,
    pub program: &'a Path,
    pub args: Vec<OsString>,
    /// Signal that makes the server shut down cleanly (TERM, or INT for PostgreSQL's
    /// fast shutdown).
    pub stop_signal: &'static str,
    /// Signal for [`Stop::Kill`], a simulated crash: KILL, or QUIT for PostgreSQL,
    /// whose backends would otherwise linger after their postmaster died and block
    /// the restart.
    pub kill_signal: &'static str,
    /// Seconds to wait after the stop signal before SIGKILL.
    pub grace_secs: u32,
    /// Appended to; the server's stdout and stderr go here.
    pub log: &'a Path,
    /// Removed by the watchdog once the owner is gone.
    pub cleanup_dir: &'a Path,
    pub run_as: Option<RunAs>,
    pub env: Vec<(OsString, OsString)>,
}

/// A server process under its watchdog.
pub(crate) struct Supervised {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Supervised {
    pub fn spawn(spec: Spec<'_>) -> Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log)
            .context(|| format!("opening {}", spec.log.display()))?;
        let log2 = log
            .try_clone()
            .context(|| format!("duplicating {}", spec.log.display()))?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg(format!("{}-watchdog", spec.name))
            .arg(spec.stop_signal)
            .arg(spec.kill_signal)
            .arg(spec.grace_secs.to_string())
            .arg(spec.cleanup_dir)
            .arg(spec.program)
            .args(&spec.args)
            .envs(spec.env)
            .current_dir(spec.cleanup_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        if let Some(user) = spec.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(user.uid).gid(user.gid);
        }
        let mut child = cmd
            .spawn()
            .context(|| format!("spawning {} under a bash watchdog", spec.program.display()))?;
        let stdin = child.stdin.take();
        Ok(Self {
            name: spec.name,
            child,
            stdin,
            log: spec.log.to_path_buf(),
        })
    }

    /// `Some(status)` once the server (and so its watchdog) has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails with the log tail if the server exited; used while waiting for it.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.exited() {
            Some(status) => Err(self.start_error(format!("exited during start-up ({status})"))),
            None => Ok(()),
        }
    }

    pub fn start_error(&self, reason: String) -> TestbedError {
        start_error(self.name, &self.log, reason)
    }

    /// Stops the server, keeping its files, and waits for it to be gone.
    pub async fn shutdown(mut self, how: Stop) -> Result<()> {
        let cmd = match how {
            Stop::Graceful => "stop\n",
            Stop::Kill => "kill\n",
        };
        if let Some(stdin) = self.stdin.as_mut() {
            // A write error means the watchdog is already gone, which is the goal.
            let _ = stdin.write_all(cmd.as_bytes()).and_then(|()| stdin.flush());
        }
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    return Err(TestbedError::Io {
                        context: format!("waiting for {} to stop", self.name),
                        source: e,
                    });
                }
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // EOF on the pipe: the watchdog stops the server and removes its files, as
        // when the whole process exits. Waiting makes a dropped private server
        // release its port and files before the next test starts.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The user to run a server as. PostgreSQL refuses to run as root, and tests here
/// may well run as root (CI containers), so then it runs as the `postgres` user.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `None` when this process is not root; else the given system user.
    pub fn unprivileged(user: &str) -> Result<Option<Self>> {
        use std::os::unix::fs::MetadataExt;
        // /proc/self is owned by the effective uid of the process reading it.
        let euid = std::fs::metadata("/proc/self")
            .context(|| "reading /proc/self".into())?
            .uid();
        if euid != 0 {
            return Ok(None);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").context(|| "reading /etc/passwd".into())?;
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == user)
            .and_then(|f| {
                Some(Self {
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                })
            })
            .map(Some)
            .ok_or_else(|| {
                TestbedError::Other(format!(
                    "running as root and there is no '{user}' user to run the server as \
                     (Debian's postgresql package creates it; or run the tests as non-root)"
                ))
            })
    }

    /// Hands a file or directory to this user.
    pub fn chown(self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).context(|| format!("chown {}", path.display()))
    }
}

pub(crate) fn start_error(server: &'static str, log: &Path, reason: String) -> TestbedError {
    TestbedError::Start {
        server,
        reason,
        log: log.to_path_buf(),
        tail: log_tail(log, 40),
    }
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read log: {e})"),
    }
}

/// A loopback port that was free a moment ago. Another process may grab it before
/// the server binds it; the start then fails with "address in use" in the log.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context(|| "binding 127.0.0.1:0".into())?;
    Ok(listener
        .local_addr()
        .context(|| "reading a bound address".into())?
        .port())
}

/// Runs a short command to completion with its output going to `log`; a non-zero
/// exit becomes an error holding the log tail.
pub(crate) async fn run_logged(context: &str, mut cmd: Command, log: &Path) -> Result<()> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone().context(|| format!("duplicating {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let context = context.to_string();
    let status = tokio::task::spawn_blocking(move || cmd.status())
        .await
        .map_err(|e| TestbedError::Other(format!("{context}: {e}")))?
        .context(|| format!("running {context}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(TestbedError::Command {
            context,
            status,
            output: log_tail(log, 40),
        })
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `probe` until it returns `Ok(Some(_))`, the server dies, or `timeout`.
pub(crate) async fn wait_ready<T, F, Fut>(server: &mut Supervised, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        server.ensure_running()?;
        // A probe may hang on a half-started server (e.g. a TLS handshake that
        // never completes); bound each attempt so the overall timeout holds.
        let last = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => format!("probe did not answer within {PROBE_TIMEOUT:?}"),
        };
        if Instant::now() >= deadline {
            return Err(server.start_error(format!("not ready after {timeout:?}; last probe: {last}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A random alphanumeric string, for passwords, tokens and ids.
pub(crate) fn random_string(len: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A fresh temp dir for one server. Set `OUTBOX_TESTBED_KEEP=1` to keep the dirs
/// (data and logs) after the tests, for debugging.
pub(crate) fn server_dir(name: &str) -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("outbox-testbed-{name}-"))
        .tempdir()
        .context(|| format!("creating a temp dir for {name}"))?;
    dir.disable_cleanup(keep_files());
    Ok(dir)
}

pub(crate) fn keep_files() -> bool {
    std::env::var_os("OUTBOX_TESTBED_KEEP").is_some_and(|v| !v.is_empty())
}

/// A server that a test may stop and start again on the same data and ports.
pub(crate) struct Restartable {
    name: &'static str,
    server: Mutex<Option<Supervised>>,
}

impl Restartable {
    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            name,
            server: Mutex::new(None),
        }
    }

    pub(crate) fn set(&self, server: Supervised) {
        *lock(&self.server) = Some(server);
    }

    /// Stops the server if it runs; its data dir and ports stay for a relaunch.
    pub(crate) async fn halt(&self, how: Stop) -> Result<()> {
        let server = lock(&self.server).take();
        match server {
            Some(s) => s.shutdown(how).await,
            None => Ok(()),
        }
    }

    /// Refuses to start a second copy over a running one.
    pub(crate) fn ensure_stopped(&self) -> Result<()> {
        if lock(&self.server).is_some() {
            return Err(TestbedError::Other(format!("{} is already running", self.name)));
        }
        Ok(())
    }
}

/// Locks a mutex, ignoring poisoning: a test that panicked while holding it leaves
/// the process handle itself intact.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
