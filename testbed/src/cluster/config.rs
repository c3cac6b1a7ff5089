//! The configuration files of the node's daemons, as pure functions of the paths.
//! The settings that are not defaults say why; two of them are needed on these
//! machines and are not obvious (`restrict_oom_score_adj`, `makeIPTablesUtilChains`).

use std::path::Path;

use super::isolate::{BRIDGE, BRIDGE_ADDRESS, POD_CIDR};
use crate::kube_api::SERVICE_CIDR;

/// containerd 1.6's configuration (format version 2), everything under `root`.
pub(crate) fn containerd_toml(root: &Path, socket: &Path, pause_tag: &str, runc: &Path, cni_bin: &Path) -> String {
    let r = root.display();
    format!(
        r#"version = 2
root = "{r}/containerd/root"
state = "{r}/containerd/state"
# Plugins this node has no use for, and that would probe the host at start-up.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{r}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # Built here (hack/testbed), never pulled: there is no registry.
  sandbox_image = "{pause_tag}"
  # The VM lacks CAP_SYS_RESOURCE, so runc cannot lower oom_score_adj to the
  # kubelet's -998; without this every pod fails with "can't get final child's PID".
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  disable_apparmor = true
  # Pod network namespaces under the state dir, not in the host's /run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{r}/cni/net.d"
    max_conf_num = 1
"#,
        socket = socket.display(),
        runc = runc.display(),
        cni = cni_bin.display(),
    )
}

/// One bridge network: pods get an address in [`POD_CIDR`], a route to the bridge's
/// subnet and to the service range through the bridge address (kube-proxy's rules
/// there translate ClusterIPs), and nothing else: no default route, no masquerade.
pub(crate) fn cni_conflist(root: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "outbox-testbed",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_CIDR, "gateway": BRIDGE_ADDRESS.to_string() }]],
                "routes": [{ "dst": SERVICE_CIDR }],
                "dataDir": root.join("cni").join("ipam"),
            },
        }],
    })
    .to_string()
}

/// The kubelet's configuration file.
pub(crate) fn kubelet_yaml(socket: &Path, pods_dir: &Path, client_ca: &Path) -> String {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": format!("unix://{}", socket.display()),
        "cgroupDriver": "cgroupfs",
        "failSwapOn": false,
        // No cluster DNS: pods get an empty resolv.conf and use addresses.
        "resolvConf": "",
        // Else the kubelet adds its chains to the iptables of the namespace it runs in.
        "makeIPTablesUtilChains": false,
        "address": "127.0.0.1",
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        // The API server reaches the kubelet (logs, exec) on loopback inside the
        // private network namespace, where nothing else can connect.
        "authentication": {
            "anonymous": { "enabled": true },
            "webhook": { "enabled": false },
            "x509": { "clientCAFile": client_ca },
        },
        "authorization": { "mode": "AlwaysAllow" },
        "podLogsDir": pods_dir,
        // Images are imported, never pulled: garbage-collecting them would break
        // the next pod. Likewise no eviction because a busy disk looks full.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": { "memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%" },
        "volumeStatsAggPeriod": "0s",
        "serializeImagePulls": false,
        "registerNode": true,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_have_no_default_route_and_no_masquerade() {
        let v: serde_json::Value = serde_json::from_str(&cni_conflist(Path::new("/x"))).unwrap();
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["ipMasq"], false);
        let routes = bridge["ipam"]["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0]["dst"], SERVICE_CIDR);
        assert!(routes.iter().all(|r| r["dst"] != "0.0.0.0/0"));
    }

    #[test]
    fn containerd_has_the_settings_this_machine_needs() {
        let t = containerd_toml(
            Path::new("/r"),
            Path::new("/r/c.sock"),
            "p:1",
            Path::new("/usr/sbin/runc"),
            Path::new("/cni"),
        );
        assert!(t.contains("restrict_oom_score_adj = true"));
        assert!(t.contains("SystemdCgroup = false"));
        assert!(t.contains("sandbox_image = \"p:1\""));
    }

    #[test]
    fn kubelet_leaves_iptables_alone() {
        let v: serde_json::Value =
            serde_json::from_str(&kubelet_yaml(Path::new("/s"), Path::new("/p"), Path::new("/ca"))).unwrap();
        assert_eq!(v["makeIPTablesUtilChains"], false);
        assert_eq!(v["cgroupDriver"], "cgroupfs");
    }
}
