//! Small helpers shared by the parsers: the "ignored vs. valid" outcome, error construction,
//! well-known labels, and strict parsing of addresses and CIDRs.
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Kind, ModelError, ObjectRef, Protocol};

/// Label on Services/EndpointSlices meant for another proxy. kube-proxy's informers select
/// `!service.kubernetes.io/service-proxy-name`, so such objects never reach its trackers.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label of headless Services' EndpointSlices; kube-proxy's informers exclude it too.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// EndpointSlice label naming the owning Service (discovery.LabelServiceName).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Node label carrying the topology zone (v1.LabelTopologyZone).
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// EndpointSlice annotation set by the EndpointSlice controller (v1.EndpointsLastChangeTriggerTime).
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// Result of reading an object that was not invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Not an error, but nothing to program (kube-proxy would never see or would skip it).
    Ignored(&'static str),
    Valid(T),
}

impl<T> Parsed<T> {
    pub fn valid(self) -> Option<T> {
        match self {
            Parsed::Valid(t) => Some(t),
            Parsed::Ignored(_) => None,
        }
    }
}

/// The reference of an object as far as its metadata allows (empty strings when missing, so
/// an error about a missing name can still say which kind of object it was).
pub fn object_ref(kind: Kind, meta: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

pub fn invalid(
    object: &ObjectRef,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> ModelError {
    ModelError::Invalid {
        object: object.clone(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Require metadata.name (and metadata.namespace for namespaced kinds).
pub fn require_identity(object: &ObjectRef, namespaced: bool) -> Result<(), ModelError> {
    if object.name.is_empty() {
        return Err(invalid(object, "metadata.name", "missing"));
    }
    if namespaced && object.namespace.is_empty() {
        return Err(invalid(object, "metadata.namespace", "missing"));
    }
    Ok(())
}

/// True if the object carries a label that makes kube-proxy's informers filter it out.
pub fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(label))
}

/// Parse an IP address (no surrounding whitespace, no zone). Like kube-proxy's
/// netutils.ParseIPSloppy, IPv4 octets with leading zeros are read as decimal: objects
/// created before the API server rejected them may still carry such addresses.
pub fn parse_ip(object: &ObjectRef, field: &str, text: &str) -> Result<IpAddr, ModelError> {
    sloppy_ip(text).ok_or_else(|| invalid(object, field, format!("{text:?} is not an IP address")))
}

fn sloppy_ip(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::from(octets))
}

/// Parse a CIDR. Like Go's ParseCIDR the address is masked to the network
/// (`10.0.0.1/24` means `10.0.0.0/24`); IPv4 leading zeros are tolerated as in parse_ip.
pub fn parse_cidr(object: &ObjectRef, field: &str, text: &str) -> Result<IpNet, ModelError> {
    let bad = || invalid(object, field, format!("{text:?} is not a CIDR"));
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let ip = sloppy_ip(addr).ok_or_else(bad)?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    IpNet::new(ip, len).map(|n| n.trunc()).map_err(|_| bad())
}

/// Kubernetes `Protocol`: absent means TCP (the API default).
pub fn parse_protocol(
    object: &ObjectRef,
    field: &str,
    text: Option<&str>,
) -> Result<Protocol, ModelError> {
    match text {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(invalid(
            object,
            field,
            format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
        )),
    }
}

/// A port number 1..=65535.
pub fn parse_port(object: &ObjectRef, field: &str, value: i32) -> Result<u16, ModelError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(
            object,
            field,
            format!("{value} is not a port number (1-65535)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj() -> ObjectRef {
        ObjectRef {
            kind: Kind::Service,
            namespace: "ns".into(),
            name: "n".into(),
        }
    }

    #[test]
    fn ports_table() {
        let cases: &[(i32, Option<u16>)] = &[
            (1, Some(1)),
            (80, Some(80)),
            (65535, Some(65535)),
            (0, None),
            (-1, None),
            (65536, None),
        ];
        for (value, want) in cases {
            let got = parse_port(&obj(), "f", *value).ok();
            assert_eq!(got, *want, "port {value}");
        }
    }

    #[test]
    fn protocols_table() {
        let cases: &[(Option<&str>, Option<Protocol>)] = &[
            (None, Some(Protocol::Tcp)),
            (Some("TCP"), Some(Protocol::Tcp)),
            (Some("UDP"), Some(Protocol::Udp)),
            (Some("SCTP"), Some(Protocol::Sctp)),
            (Some("tcp"), None),
            (Some("ICMP"), None),
            (Some(""), None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_protocol(&obj(), "f", *text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn addresses_and_cidrs_table() {
        let ips: &[(&str, bool)] = &[
            ("10.0.0.1", true),
            ("fd00::1", true),
            (" 10.0.0.1", false),
            ("10.0.0.256", false),
            ("fe80::1%eth0", false),
            ("", false),
            ("010.000.000.001", true),
            ("10.0.0", false),
            ("10.0.0.1.2", false),
            ("10.0.0.0256", false),
            ("+1.0.0.1", false),
        ];
        for (text, ok) in ips {
            assert_eq!(parse_ip(&obj(), "f", text).is_ok(), *ok, "{text:?}");
        }
        let cidrs: &[(&str, Option<&str>)] = &[
            ("10.0.0.0/8", Some("10.0.0.0/8")),
            ("10.1.2.3/16", Some("10.1.0.0/16")),
            ("fd00::1/64", Some("fd00::/64")),
            ("10.0.0.1", None),
            ("10.0.0.0/33", None),
            ("010.001.0.0/16", Some("10.1.0.0/16")),
            ("::/0", Some("::/0")),
            ("10.0.0.0/", None),
            ("10.0.0.0/+8", None),
            ("fd00::/129", None),
            ("nonsense", None),
        ];
        for (text, want) in cidrs {
            let got = parse_cidr(&obj(), "f", text).ok().map(|n| n.to_string());
            assert_eq!(got.as_deref(), *want, "{text:?}");
        }
    }

    #[test]
    fn identity_table() {
        let cases: &[(&str, &str, bool, Option<&str>)] = &[
            ("ns", "n", true, None),
            ("", "n", true, Some("metadata.namespace")),
            ("", "n", false, None),
            ("ns", "", true, Some("metadata.name")),
        ];
        for (ns, name, namespaced, want) in cases {
            let o = ObjectRef {
                kind: Kind::Service,
                namespace: ns.to_string(),
                name: name.to_string(),
            };
            let got = require_identity(&o, *namespaced).err().map(|e| match e {
                ModelError::Invalid { field, .. } => field,
            });
            assert_eq!(got.as_deref(), *want, "{ns:?}/{name:?}");
        }
    }
}
