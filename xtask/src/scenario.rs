//! Typed view of the conformance scenario files (see shared/scenarios/FORMAT.md).
//!
//! The Kubernetes manifests stay `serde_yaml::Value`: the lab writes them back out verbatim for
//! shunt and only reads the few EndpointSlice fields it needs to place endpoint servers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml::Value;

#[derive(Debug, Deserialize)]
pub struct ScenarioFile {
    pub format_version: u32,
    pub scenarios: Vec<Scenario>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Scenario {
    pub id: String,
    pub name: String,
    pub node: Node,
    pub cluster: Cluster,
    pub services: Vec<Value>,
    pub endpointslices: Vec<Value>,
    pub packets: Vec<Packet>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    pub name: String,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub ipv4: Vec<std::net::Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Vec<std::net::Ipv6Addr>,
}

impl Node {
    /// Every node address, IPv4 first; the first of each family is the primary.
    pub fn ips(&self) -> Vec<IpAddr> {
        let v4 = self.ipv4.iter().copied().map(IpAddr::V4);
        v4.chain(self.ipv6.iter().copied().map(IpAddr::V6))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DetectLocalMode {
    ClusterCIDR,
    None,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Cluster {
    pub ip_family: IpFamily,
    pub service_cidrs: Vec<IpNet>,
    pub detect_local_mode: DetectLocalMode,
    #[serde(default)]
    pub cluster_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub masquerade_all: bool,
    pub node_port_addresses: Vec<IpNet>,
}

// Variant names are the Kubernetes/YAML spellings, deserialized as written.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Protocol {
    TCP,
    UDP,
    SCTP,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::TCP),
            "UDP" => Some(Self::UDP),
            "SCTP" => Some(Self::SCTP),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Packet {
    pub name: String,
    pub protocol: Protocol,
    pub source_ip: IpAddr,
    pub dest_ip: IpAddr,
    pub dest_port: u16,
    pub expect: RawExpect,
}

impl Packet {
    pub fn dest(&self) -> SocketAddr {
        SocketAddr::new(self.dest_ip, self.dest_port)
    }
}

/// `expect` exactly as written; [`RawExpect::resolve`] checks the one-of rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpect {
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub verdict: Option<Verdict>,
    #[serde(default)]
    pub masquerade: Option<MasqField>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Drop,
    Reject,
    Passthrough,
}

/// `masquerade:` is a YAML bool or the string `any`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MasqField {
    Bool(bool),
    Word(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masq {
    Yes,
    No,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expectation {
    Endpoints { set: Vec<SocketAddr>, masq: Masq },
    Drop,
    Reject,
    Passthrough { masq: Masq },
}

impl RawExpect {
    pub fn resolve(&self) -> Result<Expectation> {
        let masq = match &self.masquerade {
            None => None,
            Some(MasqField::Bool(true)) => Some(Masq::Yes),
            Some(MasqField::Bool(false)) => Some(Masq::No),
            Some(MasqField::Word(w)) if w == "any" => Some(Masq::Any),
            Some(MasqField::Word(w)) => bail!("masquerade: unknown value {w:?}"),
        };
        match (&self.endpoints, self.verdict) {
            (Some(_), Some(_)) => bail!("expect has both endpoints and verdict"),
            (None, None) => bail!("expect has neither endpoints nor verdict"),
            (Some(eps), None) => {
                let set = eps
                    .iter()
                    .map(|e| {
                        e.parse()
                            .with_context(|| format!("expect.endpoints: bad address {e:?}"))
                    })
                    .collect::<Result<Vec<SocketAddr>>>()?;
                if set.is_empty() {
                    bail!("expect.endpoints is empty");
                }
                let masq = masq.context("expect.masquerade is required with endpoints")?;
                Ok(Expectation::Endpoints { set, masq })
            }
            (None, Some(Verdict::Drop)) => Ok(Expectation::Drop),
            (None, Some(Verdict::Reject)) => Ok(Expectation::Reject),
            (None, Some(Verdict::Passthrough)) => Ok(Expectation::Passthrough {
                masq: masq.unwrap_or(Masq::No),
            }),
        }
    }
}

/// One endpoint address as the EndpointSlices describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub node_name: Option<String>,
    /// (protocol, port) of every slice the address appears in.
    pub ports: Vec<(Protocol, u16)>,
}

impl Scenario {
    /// Endpoint addresses from the EndpointSlices, merged by address.
    pub fn endpoints(&self) -> Result<Vec<EndpointInfo>> {
        let mut by_ip: BTreeMap<IpAddr, EndpointInfo> = BTreeMap::new();
        for (i, slice) in self.endpointslices.iter().enumerate() {
            let what = || format!("{}: endpointslices[{i}]", self.id);
            let mut ports = Vec::new();
            for p in seq(slice.get("ports")) {
                let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                let proto = Protocol::parse(proto)
                    .with_context(|| format!("{}: ports[].protocol {proto:?}", what()))?;
                let Some(port) = p.get("port").and_then(Value::as_u64) else {
                    continue;
                };
                let port = u16::try_from(port)
                    .with_context(|| format!("{}: ports[].port {port}", what()))?;
                ports.push((proto, port));
            }
            for ep in seq(slice.get("endpoints")) {
                let node_name = ep
                    .get("nodeName")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                for a in seq(ep.get("addresses")) {
                    let s = a
                        .as_str()
                        .with_context(|| format!("{}: endpoints[].addresses", what()))?;
                    let ip: IpAddr = s
                        .parse()
                        .with_context(|| format!("{}: endpoints[].addresses {s:?}", what()))?;
                    let e = by_ip.entry(ip).or_insert_with(|| EndpointInfo {
                        ip,
                        node_name: None,
                        ports: vec![],
                    });
                    if e.node_name.is_none() {
                        e.node_name = node_name.clone();
                    }
                    for p in &ports {
                        if !e.ports.contains(p) {
                            e.ports.push(*p);
                        }
                    }
                }
            }
        }
        Ok(by_ip.into_values().collect())
    }

    /// LoadBalancer ingress IPs and externalIPs of all Services.
    pub fn service_vips(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for svc in &self.services {
            let spec = svc.get("spec");
            for v in seq(spec.and_then(|s| s.get("externalIPs"))) {
                out.extend(v.as_str().and_then(|s| s.trim().parse::<IpAddr>().ok()));
            }
            let ingress = svc
                .get("status")
                .and_then(|s| s.get("loadBalancer"))
                .and_then(|l| l.get("ingress"));
            for i in seq(ingress) {
                out.extend(
                    i.get("ip")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<IpAddr>().ok()),
                );
            }
        }
        out
    }

    /// NodePort numbers of all Services (any protocol).
    pub fn node_ports(&self) -> Vec<(Protocol, u16)> {
        let mut out = Vec::new();
        for svc in &self.services {
            for p in seq(svc.get("spec").and_then(|s| s.get("ports"))) {
                let proto = p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .and_then(Protocol::parse);
                let port = p
                    .get("nodePort")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok());
                if let (Some(proto), Some(port)) = (proto.or(Some(Protocol::TCP)), port) {
                    out.push((proto, port));
                }
            }
        }
        out
    }
}

fn seq(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_sequence).into_iter().flatten()
}

/// Loads every scenario of the given files/directories (directories: their `*.yaml`, sorted).
pub fn load(paths: &[PathBuf]) -> Result<Vec<Scenario>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p.clone());
        }
    }
    let mut out = Vec::new();
    for f in files {
        out.extend(load_file(&f)?);
    }
    Ok(out)
}

pub fn load_file(path: &Path) -> Result<Vec<Scenario>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<Scenario>> {
    let file: ScenarioFile = serde_yaml::from_str(text)?;
    if file.format_version != 1 {
        bail!("unsupported format_version {}", file.format_version);
    }
    for s in &file.scenarios {
        for p in &s.packets {
            p.expect
                .resolve()
                .with_context(|| format!("{} :: {}", s.id, p.name))?;
        }
    }
    Ok(file.scenarios)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(y: &str) -> RawExpect {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn expectations_resolve() {
        let e = raw("endpoints: ['10.180.0.1:80', '[fd00:10:180::1]:80']\nmasquerade: true")
            .resolve()
            .unwrap();
        let set = vec![
            "10.180.0.1:80".parse().unwrap(),
            "[fd00:10:180::1]:80".parse().unwrap(),
        ];
        assert_eq!(
            e,
            Expectation::Endpoints {
                set,
                masq: Masq::Yes
            }
        );
        assert_eq!(raw("verdict: drop").resolve().unwrap(), Expectation::Drop);
        assert_eq!(
            raw("verdict: reject").resolve().unwrap(),
            Expectation::Reject
        );
        let p = raw("verdict: passthrough\nmasquerade: false")
            .resolve()
            .unwrap();
        assert_eq!(p, Expectation::Passthrough { masq: Masq::No });
        let any = raw("endpoints: ['10.0.0.1:1']\nmasquerade: any")
            .resolve()
            .unwrap();
        assert!(matches!(
            any,
            Expectation::Endpoints {
                masq: Masq::Any,
                ..
            }
        ));
    }

    #[test]
    fn malformed_expectations_are_errors() {
        assert!(
            raw("verdict: drop\nendpoints: ['10.0.0.1:1']")
                .resolve()
                .is_err()
        );
        assert!(raw("masquerade: true").resolve().is_err());
        assert!(raw("endpoints: ['10.0.0.1:1']").resolve().is_err());
        assert!(
            raw("endpoints: ['10.0.0.1']\nmasquerade: true")
                .resolve()
                .is_err()
        );
        assert!(
            raw("endpoints: ['10.0.0.1:1']\nmasquerade: maybe")
                .resolve()
                .is_err()
        );
        assert!(serde_yaml::from_str::<RawExpect>("verdict: accept").is_err());
        assert!(serde_yaml::from_str::<RawExpect>("verdict: drop\nextra: 1").is_err());
    }

    #[test]
    fn shared_scenarios_parse_with_endpoint_info() {
        let all = load(&crate::conformance::default_paths(&[])).unwrap();
        assert!(all.len() >= 7);
        let s = all.iter().find(|s| s.id == "basic_clusterip/base").unwrap();
        let eps = s.endpoints().unwrap();
        let remote = eps
            .iter()
            .find(|e| e.ip.to_string() == "10.180.2.1")
            .unwrap();
        assert_eq!(remote.node_name.as_deref(), Some("node2"));
        assert!(
            remote.ports.contains(&(Protocol::TCP, 5353))
                && remote.ports.contains(&(Protocol::SCTP, 53))
        );
        let e = all
            .iter()
            .find(|s| s.id == "external_traffic_policy_local/base")
            .unwrap();
        assert_eq!(e.service_vips().len(), 2);
        assert_eq!(e.node_ports(), vec![(Protocol::TCP, 3001)]);
    }
}
