//! `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1), as written by kubeadm and
//! friends, in YAML or JSON (JSON is read by the same YAML parser).
//!
//! Every field of the released v1alpha1 type (staging/src/k8s.io/kube-proxy/config/v1alpha1/
//! types.go) is known here, so a real kube-proxy config file loads; any other key is an error
//! (kube-proxy decodes strictly first, config/options.go `loadConfig`). Fields that only tune
//! things shunt does not do (client QPS, IPVS, Windows, profiling, …) are read and ignored;
//! `Settings` warns when one is set to something other than its default where that matters.
use std::collections::BTreeMap;

use serde::Deserialize;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    /// component-base LoggingConfiguration: only `verbosity` matters to shunt; the rest
    /// (format, flushFrequency, options, vmodule) is accepted as is.
    pub logging: Option<Logging>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<IptablesConfig>,
    pub ipvs: Option<IpvsConfig>,
    pub nftables: Option<NftablesConfig>,
    pub winkernel: Option<serde_yaml::Value>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocalConfig>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<ConntrackConfig>,
    pub config_sync_period: Option<String>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    pub verbosity: Option<u8>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IptablesConfig {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub localhost_node_ports: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NftablesConfig {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpvsConfig {
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<String>,
    pub tcp_fin_timeout: Option<String>,
    pub udp_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocalConfig {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConntrackConfig {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<String>,
    pub udp_stream_timeout: Option<String>,
}

/// Parse the file's text (YAML or JSON) and check apiVersion/kind.
pub fn parse(text: &str) -> Result<KubeProxyConfiguration, String> {
    let cfg: KubeProxyConfiguration = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    match cfg.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(format!(
                "field apiVersion: unsupported value {other:?}: must be {API_VERSION:?}"
            ));
        }
        None => {
            return Err(format!(
                "field apiVersion: missing (must be {API_VERSION:?})"
            ));
        }
    }
    match cfg.kind.as_deref() {
        Some(KIND) => {}
        Some(other) => {
            return Err(format!(
                "field kind: unsupported value {other:?}: must be {KIND:?}"
            ));
        }
        None => return Err(format!("field kind: missing (must be {KIND:?})")),
    }
    Ok(cfg)
}
