//! A real single-node Kubernetes cluster for end-to-end tests: etcd and
//! kube-apiserver ([`KubeApi`]), kube-controller-manager, kube-scheduler,
//! containerd with runc and the CNI bridge, the kubelet and kube-proxy (iptables
//! mode), plus PostgreSQL and Kafka listening where pods can reach them.
//!
//! Everything runs in private namespaces ([`isolate`]); test binaries that use the
//! cluster have `harness = false` and call [`main`], which sets those up. Pods reach
//! the API server through the `kubernetes` Service like in any cluster, and the
//! bed's PostgreSQL and Kafka at the bridge's address [`BRIDGE_ADDRESS`], which is
//! also where the test process reaches all three.
//!
//! Images are never pulled: [`Cluster::load_binary_image`] builds the Dockerfile's
//! runtime around a binary (`hack/image dockerfile`, podman) and imports it into
//! containerd, and the pause image comes from `hack/testbed fetch`.

mod config;
mod harness;
mod isolate;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::Api;

pub use harness::{TestFn, main, run_isolated};
pub use isolate::{BRIDGE_ADDRESS, POD_CIDR};

use crate::components::ClusterComponents;
use crate::error::{Context, Result, TestbedError};
use crate::kafka::Kafka;
use crate::kube_api::{ApiOptions, KubeApi};
use crate::postgres::Postgres;
use crate::process::{self, Spec, Supervised};

/// The tag `hack/testbed` gives the pause image; containerd's `sandbox_image`.
const PAUSE_TAG: &str = "outbox-testbed/pause:1";
/// The node's name. `localhost` lets the API server reach the kubelet on loopback.
pub const NODE_NAME: &str = "localhost";
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// PATH for the node daemons: kube-proxy and the kubelet run iptables, mount, etc.
const NODE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A running cluster and the servers its pods use.
pub struct Cluster {
    // Dropped (stopped) in field order: node daemons before the control plane.
    _kube_proxy: Supervised,
    _kubelet: Supervised,
    _scheduler: Supervised,
    _controller_manager: Supervised,
    _containerd: Supervised,
    pub kube: KubeApi,
    pub pg: Postgres,
    pub kafka: Kafka,
    ctr: PathBuf,
    socket: PathBuf,
    root: PathBuf,
    logs: Vec<(&'static str, PathBuf)>,
    /// From nothing to a Ready node and the default ServiceAccount.
    pub startup: Duration,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts everything; only inside the namespaces that [`main`] sets up.
    pub async fn start() -> Result<Self> {
        if !isolate::inside() {
            return Err(TestbedError::Other(
                "the cluster runs only in its own namespaces: give the test binary \
                 `harness = false` and call outbox_testbed::cluster::main"
                    .into(),
            ));
        }
        let started = Instant::now();
        let cc = ClusterComponents::locate()?;
        let dir = process::server_dir("cluster")?;
        let root = dir.path().to_path_buf();
        for d in ["cni/net.d", "kubelet", "pods", "volume-plugins"] {
            std::fs::create_dir_all(root.join(d)).context(|| format!("creating {d}"))?;
        }

        let tokens = Tokens::new();
        let options = ApiOptions {
            address: BRIDGE_ADDRESS,
            extra_tokens: tokens.lines(),
            cluster: true,
        };
        let socket = root.join("containerd.sock");
        let (pg, kafka, kube, containerd) = tokio::try_join!(
            crate::timed("postgres", Postgres::start_on(&cc.base, BRIDGE_ADDRESS, Some(POD_CIDR))),
            crate::timed("kafka", Kafka::start_on(&cc.base, BRIDGE_ADDRESS)),
            crate::timed("kube-apiserver", KubeApi::start_with(&cc.base, &options)),
            crate::timed("containerd", start_containerd(&cc, &root, &socket)),
        )?;
        let cluster_log = |name: &str| root.join(format!("{name}.log"));

        let kc = |name: &str, token: &str| -> Result<PathBuf> {
            let p = root.join(format!("{name}.kubeconfig"));
            kube.write_kubeconfig_for(&p, token)?;
            Ok(p)
        };
        let bin = |c: &str| cc.kube_bin.join(c);
        let ca = kube.ca_path();

        let controller_manager = spawn(
            "kube-controller-manager",
            &bin("kube-controller-manager"),
            vec![
                format!(
                    "--kubeconfig={}",
                    kc("controller-manager", &tokens.controller_manager)?.display()
                ),
                // One service account per controller, as kubeadm sets it up.
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", kube.sa_key_path().display()),
                format!("--root-ca-file={}", ca.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--v=1".into(),
            ],
            &cluster_log("kube-controller-manager"),
            &root,
        )?;
        let scheduler = spawn(
            "kube-scheduler",
            &bin("kube-scheduler"),
            vec![
                format!("--kubeconfig={}", kc("scheduler", &tokens.scheduler)?.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--v=1".into(),
            ],
            &cluster_log("kube-scheduler"),
            &root,
        )?;
        std::fs::write(
            root.join("cni/net.d/10-outbox-testbed.conflist"),
            config::cni_conflist(&root),
        )
        .context(|| "writing the CNI configuration".into())?;
        let kubelet_config = root.join("kubelet.yaml");
        std::fs::write(&kubelet_config, config::kubelet_yaml(&socket, &root.join("pods"), &ca))
            .context(|| "writing the kubelet configuration".into())?;
        let kubelet = spawn(
            "kubelet",
            &bin("kubelet"),
            vec![
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", kc("kubelet", &tokens.node)?.display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={BRIDGE_ADDRESS}"),
                format!("--root-dir={}", root.join("kubelet").display()),
                format!("--volume-plugin-dir={}", root.join("volume-plugins").display()),
                "--v=1".into(),
            ],
            &cluster_log("kubelet"),
            &root,
        )?;
        let kube_proxy = spawn(
            "kube-proxy",
            &bin("kube-proxy"),
            vec![
                format!("--kubeconfig={}", kc("kube-proxy", &tokens.proxy)?.display()),
                format!("--hostname-override={NODE_NAME}"),
                "--proxy-mode=iptables".into(),
                format!("--cluster-cidr={POD_CIDR}"),
                // Leave the conntrack table size (a global setting) alone.
                "--conntrack-max-per-core=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
                "--v=1".into(),
            ],
            &cluster_log("kube-proxy"),
            &root,
        )?;

        let logs = vec![
            ("kube-controller-manager", cluster_log("kube-controller-manager")),
            ("kube-scheduler", cluster_log("kube-scheduler")),
            ("kubelet", cluster_log("kubelet")),
            ("kube-proxy", cluster_log("kube-proxy")),
            ("containerd", cluster_log("containerd")),
        ];
        let mut cluster = Self {
            _kube_proxy: kube_proxy,
            _kubelet: kubelet,
            _scheduler: scheduler,
            _controller_manager: controller_manager,
            _containerd: containerd,
            kube,
            pg,
            kafka,
            ctr: cc.ctr.clone(),
            socket,
            root,
            logs,
            startup: Duration::ZERO,
            _dir: dir,
        };
        cluster.wait_usable().await?;
        cluster.startup = started.elapsed();
        tracing::info!(elapsed = ?cluster.startup, "cluster ready");
        Ok(cluster)
    }

    /// Node Ready and the `default` ServiceAccount made (pods are refused before).
    async fn wait_usable(&mut self) -> Result<()> {
        let client = self.kube.client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for server in [
                &mut self._kubelet,
                &mut self._kube_proxy,
                &mut self._controller_manager,
                &mut self._scheduler,
                &mut self._containerd,
            ] {
                server.ensure_running()?;
            }
            let ready = nodes.get_opt(NODE_NAME).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            let sa = sas.get_opt("default").await.ok().flatten().is_some();
            if ready && sa {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Other(format!(
                    "cluster not usable after {START_TIMEOUT:?} (node ready: {ready}, default \
                     service account: {sa})\n{}",
                    self.log_tails(20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Builds the Dockerfile's `prebuilt` target around `binary` (podman, no
    /// registry, no network: `hack/image dockerfile`) and imports the image into
    /// the node's containerd under `tag`, which should start with `localhost/` (how
    /// podman names local images). Pods then use `imagePullPolicy: Never` or
    /// `IfNotPresent`.
    pub async fn load_binary_image(&self, binary: &Path, tag: &str) -> Result<()> {
        let root = crate::components::repo_root()
            .ok_or_else(|| TestbedError::Other("no repository root with hack/image found".into()))?;
        let tar = self.root.join(format!("image-{}.tar", tag.replace(['/', ':'], "_")));
        let log = self.root.join("image.log");
        let mut build = Command::new(root.join("hack").join("image"));
        build.arg("dockerfile").arg(binary).arg(tag).arg(&tar);
        if let Some(cache) = crate::components::cache_dir() {
            build.env("OUTBOX_TESTBED_CACHE", cache);
        }
        process::run_logged("hack/image", build, &log).await?;
        import(&self.ctr, &self.socket, &tar, &log).await
    }

    /// SIGKILLs a container's process through containerd, as a crash would: no
    /// SIGTERM, no clean shutdown. `id` as in a pod's `containerStatuses[].containerID`
    /// (with or without the `containerd://` prefix).
    pub async fn kill_container(&self, id: &str) -> Result<()> {
        let id = id.strip_prefix("containerd://").unwrap_or(id);
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address").arg(&self.socket).args([
            "--namespace",
            "k8s.io",
            "tasks",
            "kill",
            "--signal",
            "SIGKILL",
            id,
        ]);
        process::run_logged(&format!("ctr tasks kill {id}"), cmd, &self.root.join("ctr.log")).await
    }

    /// The last lines of every node and control-plane log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (name, path) in &self.logs {
            out.push_str(&format!(
                "--- {name} ({}) ---\n{}\n",
                path.display(),
                process::log_tail(path, lines)
            ));
        }
        out
    }

    /// The directory of the node's logs and files.
    pub fn dir(&self) -> &Path {
        &self.root
    }
}

/// Static tokens of the node's and the controllers' identities (the API server's
/// token file), the simplest authentication that needs no certificates.
struct Tokens {
    node: String,
    controller_manager: String,
    scheduler: String,
    proxy: String,
}

impl Tokens {
    fn new() -> Self {
        Self {
            node: process::random_string(32),
            controller_manager: process::random_string(32),
            scheduler: process::random_string(32),
            proxy: process::random_string(32),
        }
    }

    /// The Node authorizer and the built-in RBAC bindings know these names.
    fn lines(&self) -> Vec<String> {
        vec![
            format!("{},system:node:{NODE_NAME},node,system:nodes", self.node),
            format!("{},system:kube-controller-manager,kcm", self.controller_manager),
            format!("{},system:kube-scheduler,scheduler", self.scheduler),
            format!("{},system:kube-proxy,kube-proxy", self.proxy),
        ]
    }
}

fn spawn(name: &'static str, program: &Path, args: Vec<String>, log: &Path, dir: &Path) -> Result<Supervised> {
    Supervised::spawn(Spec {
        name,
        program,
        args: args.into_iter().map(OsString::from).collect(),
        stop_signal: "TERM",
        kill_signal: "KILL",
        grace_secs: 5,
        log,
        cleanup_dir: dir,
        run_as: None,
        env: vec![("PATH".into(), NODE_PATH.into())],
    })
}

async fn start_containerd(cc: &ClusterComponents, root: &Path, socket: &Path) -> Result<Supervised> {
    let config = root.join("containerd.toml");
    std::fs::write(
        &config,
        config::containerd_toml(root, socket, PAUSE_TAG, &cc.runc, &cc.cni_bin),
    )
    .context(|| "writing the containerd configuration".into())?;
    let log = root.join("containerd.log");
    let mut server = spawn(
        "containerd",
        &cc.containerd,
        vec![format!("--config={}", config.display())],
        &log,
        root,
    )?;
    let (ctr, sock) = (cc.ctr.clone(), socket.to_path_buf());
    process::wait_ready(&mut server, START_TIMEOUT, || {
        let (ctr, sock) = (ctr.clone(), sock.clone());
        async move {
            let out = tokio::process::Command::new(&ctr)
                .arg("--address")
                .arg(&sock)
                .arg("version")
                .output()
                .await
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        }
    })
    .await?;
    import(&cc.ctr, socket, &cc.pause_image, &root.join("image.log")).await?;
    Ok(server)
}

async fn import(ctr: &Path, socket: &Path, tar: &Path, log: &Path) -> Result<()> {
    let mut cmd = Command::new(ctr);
    cmd.arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io", "images", "import"])
        .arg(tar);
    process::run_logged(&format!("ctr images import {}", tar.display()), cmd, log).await
}

// The outcome is cached, failure included, like the shared bed's.
static SHARED: tokio::sync::OnceCell<std::result::Result<Cluster, TestbedError>> = tokio::sync::OnceCell::const_new();

/// The cluster shared by the tests of this binary, started on first use. Panics
/// (failing the test) when it cannot start.
pub async fn shared() -> &'static Cluster {
    match SHARED.get_or_init(Cluster::start).await {
        Ok(c) => c,
        Err(e) => panic!("cluster failed to start: {e}"),
    }
}
