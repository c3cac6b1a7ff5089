use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result, TestbedError};

const ENV_CACHE: &str = "OUTBOX_TESTBED_CACHE";
const ENV_PG_BIN: &str = "OUTBOX_TESTBED_PG_BIN";
const ENV_ETCD: &str = "OUTBOX_TESTBED_ETCD";
const ENV_KUBE_APISERVER: &str = "OUTBOX_TESTBED_KUBE_APISERVER";
const ENV_KUBECTL: &str = "OUTBOX_TESTBED_KUBECTL";
const ENV_HELM: &str = "OUTBOX_TESTBED_HELM";
const ENV_KAFKA_LIBS: &str = "OUTBOX_TESTBED_KAFKA_LIBS";
const ENV_JAVA: &str = "OUTBOX_TESTBED_JAVA";
const ENV_KUBE_BIN: &str = "OUTBOX_TESTBED_KUBE_BIN";
const ENV_PAUSE_IMAGE: &str = "OUTBOX_TESTBED_PAUSE_IMAGE";
const ENV_CONTAINERD: &str = "OUTBOX_TESTBED_CONTAINERD";
const ENV_RUNC: &str = "OUTBOX_TESTBED_RUNC";
const ENV_CNI_BIN: &str = "OUTBOX_TESTBED_CNI_BIN";

/// Paths of the server binaries, as resolved by `hack/testbed fetch`.
///
/// Each path comes from the environment variable of the same name when set (so a
/// developer can point at their own binaries), else from `<cache>/testbed.env`.
#[derive(Debug, Clone)]
pub struct Components {
    /// PostgreSQL bin dir: initdb, postgres, pg_ctl, psql, pg_recvlogical.
    pub pg_bin: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
    /// Renders and lints the chart in `charts/outbox-operator`.
    pub helm: PathBuf,
    /// Directory of the Kafka broker's jars (the classpath).
    pub kafka_libs: PathBuf,
    pub java: PathBuf,
}

impl Components {
    /// Finds the components, failing with a message that names the missing one and
    /// says to run `hack/testbed fetch`.
    ///
    /// The cache is found the way the script finds it: `$OUTBOX_TESTBED_CACHE`, else
    /// `.cache/testbed` under the repository root (the nearest ancestor of the
    /// current dir or of this crate that holds `hack/testbed`).
    pub fn locate() -> Result<Self> {
        let cache = cache_dir();
        let file = cache.as_ref().map(|c| c.join("testbed.env"));
        let from_file = match &file {
            Some(f) if f.is_file() => {
                parse_env_file(&std::fs::read_to_string(f).context(|| format!("reading {}", f.display()))?)
            }
            _ => HashMap::new(),
        };
        let where_from = match &file {
            Some(f) => format!("not set in the environment nor in {}", f.display()),
            None => format!(
                "not set in the environment, and no cache found ({ENV_CACHE} unset and no \
                 repository root with hack/testbed above the current dir)"
            ),
        };
        let get = |var: &'static str, component: &'static str| -> Result<PathBuf> {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| from_file.get(var).map(PathBuf::from))
                .ok_or_else(|| TestbedError::Missing {
                    component,
                    detail: format!("{var} {where_from}"),
                })
        };

        let c = Self {
            pg_bin: get(ENV_PG_BIN, "postgresql")?,
            etcd: get(ENV_ETCD, "etcd")?,
            kube_apiserver: get(ENV_KUBE_APISERVER, "kube-apiserver")?,
            kubectl: get(ENV_KUBECTL, "kubectl")?,
            helm: get(ENV_HELM, "helm")?,
            kafka_libs: get(ENV_KAFKA_LIBS, "kafka")?,
            java: get(ENV_JAVA, "java")?,
        };
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        for tool in ["initdb", "postgres", "pg_ctl", "psql", "pg_recvlogical"] {
            executable("postgresql", &self.pg_bin.join(tool))?;
        }
        executable("etcd", &self.etcd)?;
        executable("kube-apiserver", &self.kube_apiserver)?;
        executable("kubectl", &self.kubectl)?;
        executable("helm", &self.helm)?;
        executable("java", &self.java)?;
        let has_kafka_jar = std::fs::read_dir(&self.kafka_libs)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("kafka_"))
            })
            .unwrap_or(false);
        if !has_kafka_jar {
            return Err(TestbedError::Missing {
                component: "kafka",
                detail: format!("no kafka_*.jar in {}", self.kafka_libs.display()),
            });
        }
        Ok(())
    }
}

/// What a single-node cluster needs on top of [`Components`]: the node and
/// control-plane commands (`hack/testbed fetch`), the pause image, and the container
/// runtime and CNI plugins from Debian's packages (`hack/deps`).
#[derive(Debug, Clone)]
pub struct ClusterComponents {
    pub base: Components,
    /// kubelet, kube-controller-manager, kube-scheduler, kube-proxy.
    pub kube_bin: PathBuf,
    /// docker-archive of the pod sandbox image.
    pub pause_image: PathBuf,
    pub containerd: PathBuf,
    /// `containerd-shim-runc-v2`, next to containerd unless overridden with it.
    pub containerd_shim: PathBuf,
    pub ctr: PathBuf,
    pub runc: PathBuf,
    /// bridge, host-local and loopback plugins.
    pub cni_bin: PathBuf,
}

impl ClusterComponents {
    pub fn locate() -> Result<Self> {
        let base = Components::locate()?;
        let cache = cache_dir();
        let file = cache.as_ref().map(|c| c.join("testbed.env"));
        let from_file = match &file {
            Some(f) if f.is_file() => {
                parse_env_file(&std::fs::read_to_string(f).context(|| format!("reading {}", f.display()))?)
            }
            _ => HashMap::new(),
        };
        let fetched = |var: &'static str, component: &'static str| -> Result<PathBuf> {
            env_path(var)
                .or_else(|| from_file.get(var).map(PathBuf::from))
                .ok_or_else(|| TestbedError::Missing {
                    component,
                    detail: format!("{var} is set neither in the environment nor by hack/testbed fetch"),
                })
        };
        // Debian's paths; the environment variable wins.
        let packaged = |var: &'static str, default: &str| env_path(var).unwrap_or_else(|| PathBuf::from(default));
        let containerd = packaged(ENV_CONTAINERD, "/usr/bin/containerd");
        let bin_dir = containerd.parent().map(Path::to_path_buf).unwrap_or_default();
        let c = Self {
            base,
            kube_bin: fetched(ENV_KUBE_BIN, "kubelet")?,
            pause_image: fetched(ENV_PAUSE_IMAGE, "pause image")?,
            containerd_shim: bin_dir.join("containerd-shim-runc-v2"),
            ctr: bin_dir.join("ctr"),
            containerd,
            runc: packaged(ENV_RUNC, "/usr/sbin/runc"),
            cni_bin: packaged(ENV_CNI_BIN, "/usr/lib/cni"),
        };
        for cmd in ["kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy"] {
            executable("kubelet", &c.kube_bin.join(cmd))?;
        }
        let deps = "; hack/deps installs it from Debian's packages";
        for (name, path) in [
            ("containerd", &c.containerd),
            ("containerd", &c.containerd_shim),
            ("containerd", &c.ctr),
            ("runc", &c.runc),
        ] {
            executable(name, path).map_err(|e| with_hint(e, deps))?;
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            executable("containernetworking-plugins", &c.cni_bin.join(plugin)).map_err(|e| with_hint(e, deps))?;
        }
        for tool in ["iptables", "iptables-restore", "conntrack", "ip", "unshare", "mount"] {
            which(tool).map_err(|e| with_hint(e, deps))?;
        }
        if !c.pause_image.is_file() {
            return Err(TestbedError::Missing {
                component: "pause image",
                detail: format!("{} is missing", c.pause_image.display()),
            });
        }
        Ok(c)
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn with_hint(e: TestbedError, hint: &str) -> TestbedError {
    match e {
        TestbedError::Missing { component, detail } => TestbedError::Missing {
            component,
            detail: format!("{detail}{hint}"),
        },
        e => e,
    }
}

/// A command on PATH (the cluster's node tools are run by name by kube-proxy and
/// the kubelet, so PATH is what counts).
fn which(tool: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| executable(tool, p).is_ok())
        .ok_or_else(|| TestbedError::Missing {
            component: tool,
            detail: format!("{tool} is not on PATH"),
        })
}

fn executable(component: &'static str, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(TestbedError::Missing {
            component,
            detail: format!("{} is not an executable file", path.display()),
        }),
        Err(e) => Err(TestbedError::Missing {
            component,
            detail: format!("{}: {e}", path.display()),
        }),
    }
}

/// The cache folder, located as `hack/testbed` locates it.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os(ENV_CACHE).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(c));
    }
    repo_root().map(|root| root.join(".cache").join("testbed"))
}

pub(crate) fn repo_root() -> Option<PathBuf> {
    // Cargo sets CARGO_MANIFEST_DIR when it runs tests and benchmarks; the
    // compile-time value covers binaries started some other way from a checkout.
    let starts = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    starts.into_iter().flatten().find_map(|start| {
        start
            .ancestors()
            .find(|dir| dir.join("hack").join("testbed").is_file())
            .map(Path::to_path_buf)
    })
}

/// Reads the `export NAME=value` lines that `hack/testbed` writes. Values were
/// quoted with bash's `printf %q`, which for paths only adds backslashes.
fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), unescape(v.trim())))
        .collect()
}

fn unescape(v: &str) -> String {
    let v = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(v);
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bash_printf_q_output() {
        let text =
            "# comment\nexport OUTBOX_TESTBED_ETCD=/a/b\\ c/etcd\nexport OUTBOX_TESTBED_JAVA=/usr/bin/java\nnoise\n";
        let m = parse_env_file(text);
        assert_eq!(m.get("OUTBOX_TESTBED_ETCD").map(String::as_str), Some("/a/b c/etcd"));
        assert_eq!(m.get("OUTBOX_TESTBED_JAVA").map(String::as_str), Some("/usr/bin/java"));
        assert_eq!(m.len(), 2);
    }
}
