//! The cluster's private namespaces, and what is restored on the host afterwards.
//!
//! A test binary that needs the cluster runs twice. The outer run (what cargo
//! starts) records what the kubelet changes on the host, re-executes itself under
//! `unshare` in new network, mount and PID namespaces, waits, and then restores the
//! host. The inner run does the work:
//!
//! - **network**: only loopback and the bed's own bridge exist, with no default
//!   route, no masquerade and no link to the host, so nothing a pod sends can leave.
//!   PostgreSQL, Kafka and the API server listen on the bridge's address, where the
//!   test process (inside too) and the pods reach them; kube-proxy's and the
//!   kubelet's iptables rules and `net.*` sysctls live and die with the namespace.
//! - **mount**: the fixed host paths the kubelet and containerd write to whatever
//!   they are told (device plugins, pod log links, CNI cache, shim sockets) get a
//!   private tmpfs, so the host's stay untouched.
//! - **PID**: the inner run is PID 1 of its namespace. When it exits, however it
//!   exits, the kernel kills every process left there: containerd's shims, pod
//!   processes and servers whose watchdog did not get to stop them. Its stdin is a
//!   pipe held by the outer run, so the inner run also ends when the outer one does.
//!
//! Three global sysctls are set by the kubelet (`kernel.panic`,
//! `kernel.panic_on_oops`, `vm.overcommit_memory`) and its QoS cgroups stay behind
//! under `/sys/fs/cgroup/*/kubepods`: the outer run puts back the sysctls' values
//! and removes those cgroups (and the mount points it had to create) at the end.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Result, TestbedError};

/// Set in the inner run: the directory holding everything of this run.
pub(crate) const ENV_INSIDE: &str = "OUTBOX_TESTBED_CLUSTER_DIR";

/// The bridge pods are attached to, its address (the "host" address pods see) and
/// the pod subnet. Private to the network namespace, so no other network can clash.
pub const BRIDGE: &str = "obr0";
pub const BRIDGE_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 244, 0, 1);
pub const POD_CIDR: &str = "10.244.0.0/24";

/// Paths the kubelet or containerd use regardless of their configured root.
const FIXED_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/usr/libexec/kubernetes",
];

/// Global sysctls the kubelet sets at start-up (`protectKernelDefaults: false`).
const SYSCTLS: &[&str] = &["kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory"];

/// Whether this process is the inner run.
pub fn inside() -> bool {
    std::env::var_os(ENV_INSIDE).is_some()
}

/// The outer run: re-executes this binary isolated and restores the host after.
pub fn run_outer() -> ExitCode {
    match outer() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cluster test bed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn outer() -> Result<ExitCode> {
    use std::os::unix::fs::MetadataExt;
    let euid = std::fs::metadata("/proc/self")
        .context(|| "reading /proc/self".into())?
        .uid();
    if euid != 0 {
        return Err(TestbedError::Other(
            "the cluster tests run a kubelet and containerd, which need root (new network, mount \
             and PID namespaces, cgroups); run them as root"
                .into(),
        ));
    }
    let saved: Vec<(&str, String)> = SYSCTLS
        .iter()
        .filter_map(|k| Some((*k, std::fs::read_to_string(Path::new("/proc/sys").join(k)).ok()?)))
        .collect();
    let mut created = Vec::new();
    for p in FIXED_PATHS {
        let mut top = None;
        for a in Path::new(p).ancestors() {
            if a.exists() {
                break;
            }
            top = Some(a.to_path_buf());
        }
        if let Some(top) = top {
            std::fs::create_dir_all(p).context(|| format!("creating mount point {p}"))?;
            created.push(top);
        }
    }
    let run = tempfile::Builder::new()
        .prefix("outbox-testbed-cluster-")
        .tempdir()
        .context(|| "creating the cluster's directory".into())?
        .keep();
    let tmp = run.join("tmp");
    std::fs::create_dir_all(&tmp).context(|| format!("creating {}", tmp.display()))?;

    let exe = std::env::current_exe().context(|| "finding this test binary".into())?;
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"])
        .args(["--propagation", "private", "--"])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(ENV_INSIDE, &run)
        // Every temporary directory of the inner run (the servers' too) lands in
        // the run's directory, which is removed below even when its watchdogs were
        // killed with the namespace.
        .env("TMPDIR", &tmp)
        .stdin(Stdio::piped());
    let status = supervise(cmd);

    for (k, v) in &saved {
        let _ = std::fs::write(Path::new("/proc/sys").join(k), v);
    }
    remove_kubepods_cgroups();
    for dir in created {
        let _ = std::fs::remove_dir_all(dir);
    }
    if crate::process::keep_files() {
        eprintln!("cluster test bed: kept {}", run.display());
    } else {
        remove_retrying(&run);
    }
    let status = status?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Runs the inner run to its end. Ctrl-C, TERM or HUP do not end this process
/// before the host is restored: they close the lifeline, which ends the inner run
/// (and with it the whole namespace), and the restoring goes on as usual.
fn supervise(mut cmd: tokio::process::Command) -> Result<std::process::ExitStatus> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context(|| "building a runtime".into())?;
    rt.block_on(async move {
        let mut signals = Vec::new();
        for kind in [SignalKind::interrupt(), SignalKind::terminate(), SignalKind::hangup()] {
            signals.push(signal(kind).context(|| "installing a signal handler".into())?);
        }
        let mut child = cmd.spawn().context(|| "starting unshare (util-linux)".into())?;
        // Held, not closed, while waiting (`wait` would close it first): its EOF is
        // the inner run's signal that this process is gone.
        let mut lifeline = child.stdin.take();
        loop {
            let any_signal = any_of(&mut signals);
            tokio::select! {
                status = child.wait() => return status.context(|| "waiting for the isolated run".into()),
                () = any_signal => {
                    eprintln!("cluster test bed: interrupted; stopping the cluster and restoring the host");
                    drop(lifeline.take());
                }
            }
        }
    })
}

async fn any_of(signals: &mut [tokio::signal::unix::Signal]) {
    let waits = signals.iter_mut().map(|s| Box::pin(s.recv()));
    select_all(waits).await;
}

/// The first of several futures to finish (a tiny `select_all`).
async fn select_all<F: std::future::Future + Unpin>(futs: impl IntoIterator<Item = F>) {
    let mut futs: Vec<F> = futs.into_iter().collect();
    std::future::poll_fn(move |cx| {
        for f in &mut futs {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The processes of the namespace die asynchronously after its PID 1; their files
/// and cgroups can be removed once they are gone.
fn remove_retrying(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::remove_dir_all(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn remove_kubepods_cgroups() {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let roots: Vec<PathBuf> = controllers
        .flatten()
        .map(|c| c.path().join("kubepods"))
        .filter(|p| p.is_dir())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for root in roots {
        while root.exists() && Instant::now() < deadline {
            rmdir_tree(&root);
            if root.exists() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// cgroup directories are removed with rmdir, children first (their files are
/// virtual and cannot be deleted).
fn rmdir_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The inner run's set-up: tmpfs over the fixed paths, loopback and the bridge up,
/// and the lifeline to the outer run.
pub(crate) fn prepare_inside() -> Result<()> {
    for p in FIXED_PATHS {
        run("mount", &["-t", "tmpfs", "-o", "mode=0755", "tmpfs", p])?;
    }
    run("ip", &["link", "set", "lo", "up"])?;
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    let cidr = format!("{BRIDGE_ADDRESS}/24");
    run("ip", &["addr", "add", &cidr, "dev", BRIDGE])?;
    run("ip", &["link", "set", BRIDGE, "up"])?;
    std::thread::spawn(|| {
        // Only EOF (or an error) ends the read: the outer run is gone.
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        eprintln!("cluster test bed: the outer test process is gone; stopping");
        std::process::exit(101);
    });
    Ok(())
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context(|| format!("running {cmd}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TestbedError::Command {
            context: format!("{cmd} {}", args.join(" ")),
            status: out.status,
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
