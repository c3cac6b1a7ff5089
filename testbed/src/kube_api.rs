use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::components::Components;
use crate::error::{Context, Result, TestbedError};
use crate::process::{self, Spec, Supervised};

const ETCD_TIMEOUT: Duration = Duration::from_secs(60);
const APISERVER_TIMEOUT: Duration = Duration::from_secs(120);
const CRD_TIMEOUT: Duration = Duration::from_secs(30);

/// etcd plus kube-apiserver, the way envtest runs them: a real API server with
/// RBAC, admission and CRDs, but no scheduler, controllers or kubelet, so pods
/// never run. Clients authenticate with a static token in `system:masters`.
pub struct KubeApi {
    // Held only to be dropped (which stops them). Field order is drop order: the
    // API server goes before its etcd, and both before the directory.
    _apiserver: Supervised,
    _etcd: Supervised,
    address: Ipv4Addr,
    port: u16,
    etcd_port: u16,
    token: String,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
    apiserver_log: PathBuf,
    etcd_log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a [`KubeApi`] is set up: alone, as envtest runs it, or as the control plane
/// of a [`crate::Cluster`].
pub(crate) struct ApiOptions {
    /// Serving, advertised and kubeconfig address.
    pub address: Ipv4Addr,
    /// Extra lines for the static token file (`token,user,uid,"group1,group2"`):
    /// the node's and the controllers' identities.
    pub extra_tokens: Vec<String>,
    /// Node and RBAC authorization and the ServiceAccount admission plugin, as in a
    /// real cluster (where a controller-manager makes the default service accounts).
    pub cluster: bool,
}

/// The service range of every test bed API server; its first address is the
/// `kubernetes` Service's ClusterIP.
pub(crate) const SERVICE_CIDR: &str = "10.0.0.0/24";

impl KubeApi {
    pub async fn start(c: &Components) -> Result<Self> {
        let options = ApiOptions {
            address: Ipv4Addr::LOCALHOST,
            extra_tokens: Vec::new(),
            cluster: false,
        };
        Self::start_with(c, &options).await
    }

    pub(crate) async fn start_with(c: &Components, options: &ApiOptions) -> Result<Self> {
        let dir = process::server_dir("kube")?;
        let root = dir.path();
        let etcd_port = process::free_port()?;
        let peer_port = distinct_port(&[etcd_port])?;
        let etcd_log = root.join("etcd.log");
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<OsString> = vec![
            "--name=testbed".into(),
            format!("--data-dir={}", root.join("etcd").display()).into(),
            format!("--listen-client-urls={client_url}").into(),
            format!("--advertise-client-urls={client_url}").into(),
            format!("--listen-peer-urls={peer_url}").into(),
            format!("--initial-advertise-peer-urls={peer_url}").into(),
            format!("--initial-cluster=testbed={peer_url}").into(),
            "--initial-cluster-state=new".into(),
            // Throwaway data: skipping fsync keeps API writes fast on a busy disk.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let mut etcd = Supervised::spawn(Spec {
            name: "etcd",
            program: &c.etcd,
            args: etcd_args,
            stop_signal: "TERM",
            kill_signal: "KILL",
            grace_secs: 5,
            log: &etcd_log,
            cleanup_dir: root,
            run_as: None,
            env: Vec::new(),
        })?;
        process::wait_ready(&mut etcd, ETCD_TIMEOUT, || etcd_healthy(etcd_port)).await?;

        // What the API server needs besides etcd: a key to sign service-account
        // tokens with, an admin token, and a dir for its self-signed serving cert.
        let sa_key = root.join("sa.key");
        generate_key(&sa_key, &root.join("openssl.log")).await?;
        let apiserver_log = root.join("kube-apiserver.log");
        let token = process::random_string(32);
        let tokens = root.join("tokens.csv");
        let mut token_lines = format!("{token},testbed-admin,testbed-admin,system:masters\n");
        for line in &options.extra_tokens {
            token_lines.push_str(line);
            token_lines.push('\n');
        }
        std::fs::write(&tokens, token_lines).context(|| format!("writing {}", tokens.display()))?;
        let cert_dir = root.join("certs");
        let port = distinct_port(&[etcd_port, peer_port])?;

        let address = options.address;
        let mut args: Vec<OsString> = vec![
            format!("--etcd-servers={client_url}").into(),
            format!("--secure-port={port}").into(),
            format!("--bind-address={address}").into(),
            format!("--advertise-address={address}").into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}").into(),
            format!("--token-auth-file={}", tokens.display()).into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_key.display()).into(),
            format!("--service-account-signing-key-file={}", sa_key.display()).into(),
        ];
        if options.cluster {
            args.push("--authorization-mode=Node,RBAC".into());
            // What service accounts (pods) asked for and what they were answered,
            // so a test can prove that no request of the operator was forbidden.
            let policy = root.join("audit-policy.yaml");
            std::fs::write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  \
                 - level: Metadata\n    userGroups: [\"system:serviceaccounts\"]\n  - level: None\n",
            )
            .context(|| format!("writing {}", policy.display()))?;
            args.push(format!("--audit-policy-file={}", policy.display()).into());
            args.push(format!("--audit-log-path={}", root.join("audit.log").display()).into());
        } else {
            args.push("--authorization-mode=RBAC".into());
            // No controller-manager creates the default service accounts, so the
            // ServiceAccount admission plugin would reject every pod.
            args.push("--disable-admission-plugins=ServiceAccount".into());
        }
        args.extend(
            [
                format!("--cert-dir={}", cert_dir.display()),
                "--allow-privileged=true".into(),
                // Less background work on a small machine; tests do not need fairness.
                "--enable-priority-and-fairness=false".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ]
            .map(OsString::from),
        );
        let mut apiserver = Supervised::spawn(Spec {
            name: "kube-apiserver",
            program: &c.kube_apiserver,
            args,
            stop_signal: "TERM",
            kill_signal: "KILL",
            grace_secs: 5,
            log: &apiserver_log,
            cleanup_dir: root,
            run_as: None,
            env: Vec::new(),
        })?;

        let kubeconfig = root.join("kubeconfig");
        // The serving cert (and the CA that signed it, in the same file) appears
        // when the server has generated it; the kubeconfig trusts exactly that CA.
        let ca = cert_dir.join("apiserver.crt");
        process::wait_ready(&mut apiserver, APISERVER_TIMEOUT, || {
            let ca = ca.clone();
            async move {
                if ca.is_file() {
                    Ok(())
                } else {
                    Err("no serving cert yet".into())
                }
            }
        })
        .await?;
        write_kubeconfig(&kubeconfig, &format!("https://{address}:{port}"), &ca, &token)?;

        process::wait_ready(&mut apiserver, APISERVER_TIMEOUT, || {
            let kubeconfig = kubeconfig.clone();
            async move {
                let client = client_from(&kubeconfig).await.map_err(|e| e.to_string())?;
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let body = client.request_text(req).await.map_err(|e| e.to_string())?;
                if body.trim() == "ok" {
                    Ok(())
                } else {
                    Err(format!("/readyz: {body}"))
                }
            }
        })
        .await?;

        Ok(Self {
            _apiserver: apiserver,
            _etcd: etcd,
            address,
            port,
            etcd_port,
            token,
            kubeconfig,
            kubectl: c.kubectl.clone(),
            helm: c.helm.clone(),
            apiserver_log,
            etcd_log,
            _dir: dir,
        })
    }

    /// A new client on the caller's tokio runtime (kube's client runs a worker task
    /// there), authenticated as a cluster admin.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from(&self.kubeconfig).await
    }

    /// A kubeconfig for this server, usable by kubectl and kube-rs.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Installs (server-side applies) a CRD and waits until it is Established, so
    /// resources of its kind can be created right after. Idempotent, so the tests of
    /// one binary may race to install the same CRD.
    pub async fn install_crd(&self, crd: &CustomResourceDefinition) -> Result<()> {
        let client = self.client().await?;
        let crds: Api<CustomResourceDefinition> = Api::all(client);
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &PatchParams::apply("outbox-testbed").force(), &Patch::Apply(crd))
            .await
            .context(|| format!("applying CRD {name}"))?;
        let deadline = std::time::Instant::now() + CRD_TIMEOUT;
        loop {
            let current = crds.get(&name).await.context(|| format!("reading CRD {name}"))?;
            let established = current
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(TestbedError::Other(format!(
                    "CRD {name} not Established after {CRD_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kubectl --kubeconfig <this server's kubeconfig>`; add arguments and run.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// `helm --kubeconfig <this server's kubeconfig>`, with helm's cache, config and
    /// data dirs in this server's temporary directory so the user's stay untouched.
    pub fn helm(&self) -> Command {
        let home = self.kubeconfig.with_file_name("helm");
        let mut cmd = Command::new(&self.helm);
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig);
        cmd
    }

    /// `https://127.0.0.1:<port>` (or the cluster's address).
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.address, self.port)
    }

    /// The CA that signed the serving certificate (in the same file).
    pub fn ca_path(&self) -> PathBuf {
        self.kubeconfig.with_file_name("certs").join("apiserver.crt")
    }

    /// The audit log of a cluster's API server (requests of service accounts).
    pub fn audit_log_path(&self) -> PathBuf {
        self.kubeconfig.with_file_name("audit.log")
    }

    /// The private key that signs service-account tokens.
    pub(crate) fn sa_key_path(&self) -> PathBuf {
        self.kubeconfig.with_file_name("sa.key")
    }

    /// Writes a kubeconfig for another identity from the token file.
    pub(crate) fn write_kubeconfig_for(&self, path: &Path, token: &str) -> Result<()> {
        write_kubeconfig(path, &self.server_url(), &self.ca_path(), token)
    }

    /// The admin bearer token (group `system:masters`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// `http://127.0.0.1:<port>` of the etcd behind the API server.
    pub fn etcd_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    pub fn apiserver_log_path(&self) -> &Path {
        &self.apiserver_log
    }

    pub fn etcd_log_path(&self) -> &Path {
        &self.etcd_log
    }
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| TestbedError::Other(format!("reading {}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| TestbedError::Other(format!("loading {}: {e}", kubeconfig.display())))?;
    kube::Client::try_from(config).context(|| "building a kube client".into())
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> Result<()> {
    // JSON is YAML, so kubectl and kube-rs read it; no YAML writer needed.
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "testbed",
            "cluster": {
                "server": server,
                "certificate-authority": ca,
            },
        }],
        "users": [{ "name": "testbed-admin", "user": { "token": token } }],
        "contexts": [{
            "name": "testbed",
            "context": { "cluster": "testbed", "user": "testbed-admin", "namespace": "default" },
        }],
        "current-context": "testbed",
    });
    let text =
        serde_json::to_string_pretty(&doc).map_err(|e| TestbedError::Other(format!("encoding kubeconfig: {e}")))?;
    std::fs::write(path, text).context(|| format!("writing {}", path.display()))
}

/// An RSA key for signing service-account tokens, made with the openssl command
/// (present on Debian) rather than a key-generation crate.
async fn generate_key(path: &Path, log: &Path) -> Result<()> {
    let mut genkey = Command::new("openssl");
    genkey
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(path);
    process::run_logged("openssl genpkey (service-account key)", genkey, log)
        .await
        .map_err(|e| match e {
            TestbedError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => TestbedError::Missing {
                component: "openssl",
                detail: "the openssl command makes the API server's service-account key \
                         (apt-get install openssl)"
                    .into(),
            },
            e => e,
        })
}

fn distinct_port(taken: &[u16]) -> Result<u16> {
    loop {
        let p = process::free_port()?;
        if !taken.contains(&p) {
            return Ok(p);
        }
    }
}

/// etcd's `/health` over plain HTTP/1.0; a hand-written request spares an HTTP
/// client dependency for this one probe.
async fn etcd_healthy(port: u16) -> std::result::Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body))
        .await
        .map_err(|_| "no answer from /health in 2s".to_string())?
        .map_err(|e| e.to_string())?;
    if body.contains("\"health\":\"true\"") {
        Ok(())
    } else {
        Err(format!("/health: {body}"))
    }
}
