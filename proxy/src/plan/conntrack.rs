//! PURE: which UDP conntrack entries are stale, judged from the kernel's entries and the
//! current desired state (kube-proxy's pkg/proxy/conntrack/cleanup.go, `CleanStaleEntries`,
//! the reconciler that replaced the diff-based cleanup in v1.32).
//!
//! UDP has no connection teardown, so an entry DNATing a client to an endpoint that is gone
//! keeps blackholing that client, and an entry created while a Service had no endpoints (no
//! DNAT: its reply source is the Service address itself) keeps bypassing the Service once it
//! has some. TCP needs none of this: a connection to a vanished endpoint is reset or times
//! out, and a new one is a new conntrack entry.
//!
//! The rule (upstream's, as of kubernetes#127318 (v1.32), #139629 and #141371): a UDP entry is
//! stale when its original destination is a frontend of a UDP service port — `ClusterIP:port`,
//! `externalIP:port`, `loadBalancerIP:port`, or the NodePort on a NodePort address — and its
//! reply source (address and port) is not one of that service port's serving endpoints. A
//! service port without serving endpoints has none, so all its entries are stale (#139629:
//! entries DNATed before the last endpoint went away are not caught by the reject rule, and
//! one-way senders keep them alive forever); so has a service port deleted since the last sync
//! (#141371), unless a current service port reuses the frontend. Nothing else depends on
//! what was programmed before, so the first sync after a restart deletes exactly what is stale
//! and leaves every healthy established flow alone (the previous, diff-based approach had no
//! "before" after a restart and flushed every UDP Service's flows).
//!
//! Deliberate details, each documented where it is decided:
//! - Which endpoints count: every endpoint of the service port from every slice that is serving
//!   (or ready), whatever the traffic policies, topology or terminating state say — upstream
//!   ignores those so that a policy change does not break existing flows, as for TCP.
//! - A NodePort entry must be addressed to a NodePort address (upstream matches the port on
//!   any destination, which also deletes unrelated flows that happen to use that port).
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::model::{Changed, IpFamily, NodeNetwork, NodePortIps, Protocol, ServicePort, Snapshot};

/// One conntrack entry as the kernel lists it (the fields the rule reads).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConntrackEntry {
    pub family: IpFamily,
    /// IANA protocol number (17 for UDP).
    pub protocol: u8,
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    /// Who answers: the endpoint after DNAT, the original destination without it.
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// A deletion matching every UDP entry with this original destination address and port and
/// this reply source address and port (upstream's `filterForIPPortNAT`). The rule decides
/// from exactly these fields, so every entry the filter matches is stale — also one created
/// between listing and deleting — and one filter covers all clients of one stale endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConntrackFilter {
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

impl ConntrackFilter {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.orig_dst)
    }
    pub fn matches(&self, e: &ConntrackEntry) -> bool {
        e.protocol == Protocol::Udp.number()
            && e.orig_dst == self.orig_dst
            && e.orig_dport == self.orig_dport
            && e.reply_src == self.reply_src
            && e.reply_sport == self.reply_sport
    }
}

impl From<&ConntrackEntry> for ConntrackFilter {
    fn from(e: &ConntrackEntry) -> Self {
        ConntrackFilter {
            orig_dst: e.orig_dst,
            orig_dport: e.orig_dport,
            reply_src: e.reply_src,
            reply_sport: e.reply_sport,
        }
    }
}

/// The endpoints (address and port) each UDP frontend of one family accepts as reply
/// sources. An empty set means no serving endpoint: every entry to that frontend is stale.
struct Frontends<'a> {
    network: &'a NodeNetwork,
    /// (service address, service port) of ClusterIPs, externalIPs and load-balancer IPs.
    vips: BTreeMap<(IpAddr, u16), BTreeSet<SocketAddr>>,
    node_ports: BTreeMap<u16, BTreeSet<SocketAddr>>,
    /// Every ClusterIP of the snapshot (any protocol): never a local, NodePort address.
    cluster_ips: BTreeSet<IpAddr>,
}

impl<'a> Frontends<'a> {
    fn of(snapshot: &'a Snapshot, deleted: &[ServicePort]) -> Self {
        let mut f = Frontends {
            network: &snapshot.network,
            vips: BTreeMap::new(),
            node_ports: BTreeMap::new(),
            cluster_ips: BTreeSet::new(),
        };
        // Deleted service ports first, with no endpoints: a current service port that reuses
        // a frontend adds its endpoints to the same (empty) set below, so it wins (#141371).
        for p in deleted {
            if p.name.protocol == Protocol::Udp && p.family == snapshot.network.family {
                f.add(p, &BTreeSet::new());
            }
        }
        for s in snapshot.services.values() {
            f.cluster_ips.insert(s.port.cluster_ip);
            if s.port.name.protocol != Protocol::Udp {
                continue;
            }
            // Upstream counts the endpoints that are serving, ignoring traffic policies,
            // topology and terminating state: "Changes to the service should not affect
            // existing flows" (cleanup.go). Ready is counted too: the EndpointSlice
            // controller never writes ready without serving, and a flow DNATed to an endpoint
            // that new flows are still sent to is not stale. The port matters as well as the
            // address: an endpoint whose port changed no longer answers on the old one.
            let eps: BTreeSet<SocketAddr> = s
                .endpoints
                .iter()
                .filter(|e| e.serving || e.ready)
                .map(|e| e.addr())
                .collect();
            f.add(&s.port, &eps);
        }
        f
    }

    /// Adds one service port's frontends. Two service ports can claim one frontend only by
    /// misconfiguration (an externalIP equal to another Service's address); the union keeps
    /// any flow one of them could have made.
    fn add(&mut self, p: &ServicePort, eps: &BTreeSet<SocketAddr>) {
        for vip in std::iter::once(&p.cluster_ip)
            .chain(&p.external_ips)
            .chain(&p.load_balancer_ips)
        {
            self.vips
                .entry((*vip, p.port))
                .or_default()
                .extend(eps.iter().copied());
        }
        if let Some(np) = p.node_port {
            self.node_ports
                .entry(np)
                .or_default()
                .extend(eps.iter().copied());
        }
    }

    /// Whether `dst` takes NodePort traffic, as the nft plan matches it: the listed
    /// --nodeport-addresses, or any local address but loopback. Which addresses are local is
    /// not known here, so in the latter case anything but loopback and the Service CIDRs
    /// (ClusterIPs are never local addresses) counts, as upstream's port-only match does.
    fn is_node_port_destination(&self, dst: &IpAddr) -> bool {
        if dst.is_loopback() {
            return false;
        }
        match &self.network.node_port_ips {
            NodePortIps::Addresses(ips) => ips.contains(dst),
            NodePortIps::AllLocal => {
                !self.cluster_ips.contains(dst)
                    && !self.network.service_cidrs.iter().any(|n| n.contains(dst))
            }
        }
    }

    fn is_stale(&self, e: &ConntrackEntry) -> bool {
        if e.protocol != Protocol::Udp.number() || e.family != self.network.family {
            return false;
        }
        // A Service address wins over a NodePort on the same address and port: the nft plan
        // looks the destination up in the service-ips map before the NodePort check.
        let serving = match self.vips.get(&(e.orig_dst, e.orig_dport)) {
            Some(eps) => eps,
            None => match self.node_ports.get(&e.orig_dport) {
                Some(eps) if self.is_node_port_destination(&e.orig_dst) => eps,
                _ => return false,
            },
        };
        !serving.contains(&SocketAddr::new(e.reply_src, e.reply_sport))
    }
}

/// The entries of `entries` that are stale for `snapshot` (one family), given the service
/// ports deleted since the last cleanup (`deleted_udp_ports`; empty after a restart). Entries
/// of the other family, of other protocols, and of traffic that is not addressed to a UDP
/// service frontend are never returned.
pub fn stale_udp_entries(
    snapshot: &Snapshot,
    deleted: &[ServicePort],
    entries: &[ConntrackEntry],
) -> Vec<ConntrackEntry> {
    let f = Frontends::of(snapshot, deleted);
    entries.iter().filter(|e| f.is_stale(e)).cloned().collect()
}

/// The same decision as deletion filters, deduplicated and sorted: one per (frontend, stale
/// reply source) instead of one per client.
pub fn stale_udp_filters(
    snapshot: &Snapshot,
    deleted: &[ServicePort],
    entries: &[ConntrackEntry],
) -> Vec<ConntrackFilter> {
    let f = Frontends::of(snapshot, deleted);
    entries
        .iter()
        .filter(|e| f.is_stale(e))
        .map(ConntrackFilter::from)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// UDP service ports programmed before (`prev`) that the new snapshots no longer have
/// (upstream's UpdateServiceMapResult.DeletedServices, filtered to UDP as the proxiers do).
/// This is the only input that depends on an earlier sync; after a restart there is none,
/// and entries of a Service deleted meanwhile just age out.
pub fn deleted_udp_ports(prev: &[Snapshot], new: &[Snapshot]) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for old in prev {
        let now = new.iter().find(|s| s.network.family == old.network.family);
        for (name, st) in &old.services {
            let gone = now.is_none_or(|n| !n.services.contains_key(name));
            if name.protocol == Protocol::Udp && gone {
                out.push(st.port.clone());
            }
        }
    }
    out
}

/// Whether a sync can have made UDP entries stale, so that listing the conntrack table is
/// worth it (upstream runs the cleanup only when a UDP service port's endpoints changed).
/// A full resync always can; a partial one only if a changed Service has a UDP port now or
/// a UDP service port was deleted.
pub fn cleanup_needed(changed: &Changed, snapshots: &[Snapshot], deleted: &[ServicePort]) -> bool {
    match changed {
        Changed::All => true,
        Changed::Services(keys) => {
            deleted.iter().any(|p| p.name.protocol == Protocol::Udp)
                || keys.iter().any(|k| {
                    snapshots
                        .iter()
                        .any(|s| s.ports_of(k).any(|p| p.port.name.protocol == Protocol::Udp))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceKey};
    use crate::plan::nft::fixtures::*;

    const UDP: u8 = 17;
    const TCP: u8 = 6;

    /// ns1/dns: UDP 53 on ClusterIP 172.30.0.10, externalIP 192.168.99.11, LB 198.51.100.4,
    /// NodePort 30053, and its TCP 53 twin with the same endpoints; ns2/other: UDP 53 on
    /// 172.30.0.20 served by 10.180.9.9:53.
    fn dns(eps: Vec<Endpoint>) -> Snapshot {
        let tcp = port("ns1", "dns", "dns-tcp", Protocol::Tcp, "172.30.0.10", 53);
        let other = port("ns2", "other", "", Protocol::Udp, "172.30.0.20", 53);
        snapshot(
            v4_network(),
            vec![
                state(dns_port(), eps.clone()),
                state(tcp, eps),
                state(other, vec![ep("10.180.9.9", 53, None)]),
            ],
        )
    }

    fn dns_port() -> ServicePort {
        let mut p = port("ns1", "dns", "dns", Protocol::Udp, "172.30.0.10", 53);
        p.node_port = Some(30053);
        p.external_ips = vec![ip("192.168.99.11")];
        p.load_balancer_ips = vec![ip("198.51.100.4")];
        p
    }

    /// A client 10.0.0.2:`sport` talking UDP to `dst`:`dport`, answered by `reply`:53.
    fn flow(dst: &str, dport: u16, reply: &str, sport: u16) -> ConntrackEntry {
        ConntrackEntry {
            family: IpFamily::of(&ip(dst)),
            protocol: UDP,
            orig_src: ip("10.0.0.2"),
            orig_dst: ip(dst),
            orig_sport: sport,
            orig_dport: dport,
            reply_src: ip(reply),
            reply_sport: 53,
        }
    }

    fn two_endpoints() -> Vec<Endpoint> {
        vec![ep("10.180.0.1", 53, None), ep("10.180.0.2", 53, Some(NODE))]
    }

    /// Flows of ns1/dns through every frontend to both endpoints.
    fn dns_flows() -> Vec<ConntrackEntry> {
        let mut v = Vec::new();
        for (i, ep) in ["10.180.0.1", "10.180.0.2"].into_iter().enumerate() {
            let s = 40000 + i as u16;
            v.push(flow("172.30.0.10", 53, ep, s));
            v.push(flow("192.168.99.11", 53, ep, s));
            v.push(flow("198.51.100.4", 53, ep, s));
            v.push(flow("192.168.0.2", 30053, ep, s));
        }
        v
    }

    /// Another Service's flow, a direct pod-to-pod flow, DNS to the outside world.
    fn unrelated() -> Vec<ConntrackEntry> {
        vec![
            flow("172.30.0.20", 53, "10.180.9.9", 40100),
            flow("10.180.0.1", 53, "10.180.0.1", 40101),
            flow("8.8.8.8", 53, "8.8.8.8", 40102),
        ]
    }

    fn healthy_and_unrelated() -> Vec<ConntrackEntry> {
        let mut v = dns_flows();
        v.extend(unrelated());
        v
    }

    #[test]
    fn restart_with_healthy_flows_deletes_nothing() {
        let snap = dns(two_endpoints());
        let all = healthy_and_unrelated();
        assert_eq!(stale_udp_entries(&snap, &[], &all), vec![]);
        assert_eq!(stale_udp_filters(&snap, &[], &all), vec![]);
    }

    #[test]
    fn removed_endpoint_loses_exactly_its_flows_on_every_frontend() {
        let entries = healthy_and_unrelated();
        let snap = dns(vec![ep("10.180.0.2", 53, Some(NODE))]);
        let got = stale_udp_entries(&snap, &[], &entries);
        let want: Vec<ConntrackEntry> = dns_flows()
            .into_iter()
            .filter(|e| e.reply_src == ip("10.180.0.1"))
            .collect();
        assert_eq!(want.len(), 4);
        assert_eq!(got, want);
        let gone = |dst: &str, dport: u16| ConntrackFilter {
            orig_dst: ip(dst),
            orig_dport: dport,
            reply_src: ip("10.180.0.1"),
            reply_sport: 53,
        };
        assert_eq!(
            stale_udp_filters(&snap, &[], &entries),
            vec![
                gone("172.30.0.10", 53),
                gone("192.168.0.2", 30053),
                gone("192.168.99.11", 53),
                gone("198.51.100.4", 53),
            ]
        );
        // Every filter matches only entries the rule calls stale.
        for f in stale_udp_filters(&snap, &[], &entries) {
            for e in entries.iter().filter(|e| f.matches(e)) {
                assert!(got.contains(e), "{f:?} would delete {e:?}");
            }
        }
    }

    #[test]
    fn endpoint_answering_on_another_port_is_a_different_endpoint() {
        // 10.180.0.1 is still an endpoint, but now on port 5353: flows DNATed to its old
        // port go, 10.180.0.2's stay.
        let snap = dns(vec![
            ep("10.180.0.1", 5353, None),
            ep("10.180.0.2", 53, Some(NODE)),
        ]);
        let got = stale_udp_entries(&snap, &[], &healthy_and_unrelated());
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|e| e.reply_src == ip("10.180.0.1")));
        let mut moved = flow("172.30.0.10", 53, "10.180.0.1", 40200);
        moved.reply_sport = 5353;
        assert_eq!(stale_udp_entries(&snap, &[], &[moved]), vec![]);
    }

    #[test]
    fn not_serving_endpoint_is_stale_but_serving_terminating_and_remote_ones_are_not() {
        let entries = healthy_and_unrelated();
        let mut eps = two_endpoints();
        // 10.180.0.2 is terminating but still serving, 10.180.0.1 is neither ready nor
        // serving any more.
        eps[1].ready = false;
        eps[1].terminating = true;
        eps[0].ready = false;
        eps[0].serving = false;
        let mut snap = dns(eps);
        let got = stale_udp_entries(&snap, &[], &entries);
        assert!(got.iter().all(|e| e.reply_src == ip("10.180.0.1")));
        assert_eq!(got.len(), 4);
        // Traffic policies do not matter: 10.180.0.2 is the only local endpoint, and a Local
        // policy would not use the remote 10.180.0.1 — its flows are kept while it serves.
        for s in snap.services.values_mut() {
            s.port.external_policy_local = true;
            s.port.internal_policy_local = true;
            s.endpoints[0].serving = true;
        }
        assert_eq!(stale_udp_entries(&snap, &[], &entries), vec![]);
    }

    #[test]
    fn service_gaining_endpoints_loses_its_un_nated_flows() {
        // Flows made while ns1/dns had no endpoint (or before its rules existed) were never
        // DNATed: the reply comes from the address the client sent to.
        let un_nated = vec![
            flow("172.30.0.10", 53, "172.30.0.10", 41000),
            flow("192.168.99.11", 53, "192.168.99.11", 41001),
            flow("198.51.100.4", 53, "198.51.100.4", 41002),
            flow("192.168.0.2", 30053, "192.168.0.2", 41003),
        ];
        let mut all = un_nated.clone();
        all.extend(healthy_and_unrelated());
        assert_eq!(
            stale_udp_entries(&dns(two_endpoints()), &[], &all),
            un_nated
        );
    }

    #[test]
    fn service_losing_its_last_endpoint_loses_all_its_flows() {
        // kubernetes#139629: flows DNATed before the last endpoint went away bypass the
        // reject rule, and a one-way sender keeps them alive; they all go. Other Services'
        // flows and unrelated traffic stay.
        let got = stale_udp_entries(&dns(vec![]), &[], &healthy_and_unrelated());
        assert_eq!(got, dns_flows());
        let mut not_serving = two_endpoints();
        for e in &mut not_serving {
            e.ready = false;
            e.serving = false;
        }
        let got = stale_udp_entries(&dns(not_serving), &[], &healthy_and_unrelated());
        assert_eq!(got, dns_flows());
    }

    #[test]
    fn deleted_service_loses_its_flows_unless_its_address_is_reused() {
        // kubernetes#141371: ns1/dns is deleted; its ClusterIP is reused by ns5/new.
        let mut snap = dns(vec![]);
        snap.services
            .retain(|n, _| n.service.name != "dns" || n.protocol != Protocol::Udp);
        let before = [dns(two_endpoints())];
        let deleted = deleted_udp_ports(&before, std::slice::from_ref(&snap));
        assert_eq!(deleted, vec![dns_port()]);
        let all = healthy_and_unrelated();
        assert_eq!(stale_udp_entries(&snap, &deleted, &all), dns_flows());
        // Without knowing of the deletion (after a restart) nothing is deleted.
        assert_eq!(stale_udp_entries(&snap, &[], &all), vec![]);
        // Deleted TCP ports and ports of the other family are no UDP frontends of this one.
        let mut tcp = dns_port();
        tcp.name.protocol = Protocol::Tcp;
        let mut v6 = dns_port();
        v6.family = IpFamily::V6;
        assert_eq!(stale_udp_entries(&snap, &[tcp, v6], &all), vec![]);

        let new = port("ns5", "new", "", Protocol::Udp, "172.30.0.10", 53);
        let s = state(new, vec![ep("10.180.5.5", 53, None)]);
        snap.services.insert(s.port.name.clone(), s);
        let reused = flow("172.30.0.10", 53, "10.180.5.5", 45000);
        let mut entries = all.clone();
        entries.push(reused.clone());
        let got = stale_udp_entries(&snap, &deleted, &entries);
        assert!(!got.contains(&reused), "the current Service's flow is kept");
        assert_eq!(got, dns_flows());
    }

    #[test]
    fn deleted_udp_ports_are_the_udp_ports_gone_from_their_family() {
        let before = [dns(two_endpoints())];
        assert_eq!(deleted_udp_ports(&before, &before), vec![]);
        // ns2/other goes; the TCP twin of ns1/dns going is not reported.
        let mut after = before[0].clone();
        after
            .services
            .retain(|n, _| n.service.name == "dns" && n.protocol == Protocol::Udp);
        let got = deleted_udp_ports(&before, &[after]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name.service.name, "other");
        // A family no longer programmed: all its UDP ports are gone.
        assert_eq!(deleted_udp_ports(&before, &[]).len(), 2);
        assert_eq!(deleted_udp_ports(&[], &before), vec![]);
    }

    #[test]
    fn node_port_flows_need_a_node_port_address() {
        let snap = dns(vec![ep("10.180.0.2", 53, None)]);
        let entries = vec![
            // Stale: to the NodePort on a NodePort address, answered by a removed endpoint.
            flow("192.168.0.2", 30053, "10.180.0.1", 42000),
            // Port 30053 on another host (a pod talking to a remote node's NodePort): not ours.
            flow("203.0.113.7", 30053, "203.0.113.7", 42001),
            // Port 30053 on loopback: NodePorts are never served there.
            flow("127.0.0.1", 30053, "127.0.0.1", 42002),
        ];
        assert_eq!(
            stale_udp_entries(&snap, &[], &entries),
            vec![entries[0].clone()]
        );

        // With every local address taking NodePorts, only loopback and the Service CIDRs are
        // known not to be local.
        let mut all_local = snap.clone();
        all_local.network.node_port_ips = NodePortIps::AllLocal;
        let more = vec![
            entries[0].clone(),
            entries[1].clone(),
            entries[2].clone(),
            flow("172.30.0.20", 30053, "172.30.0.20", 42003),
            flow("172.30.5.5", 30053, "172.30.5.5", 42004),
        ];
        assert_eq!(
            stale_udp_entries(&all_local, &[], &more),
            vec![entries[0].clone(), entries[1].clone()]
        );
    }

    #[test]
    fn service_address_wins_over_a_node_port_on_the_same_port() {
        // ns3/ext has externalIP 192.168.0.2 port 30053, the same as ns1/dns's NodePort on
        // that address: its own endpoint answers, so the flow is healthy.
        let mut snap = dns(vec![ep("10.180.0.2", 53, None)]);
        let mut p = port("ns3", "ext", "", Protocol::Udp, "172.30.0.30", 30053);
        p.external_ips = vec![ip("192.168.0.2")];
        let s = state(p, vec![ep("10.180.7.7", 53, None)]);
        snap.services.insert(s.port.name.clone(), s);
        let entries = vec![
            flow("192.168.0.2", 30053, "10.180.7.7", 43000),
            flow("192.168.0.2", 30053, "10.180.0.1", 43001),
        ];
        assert_eq!(
            stale_udp_entries(&snap, &[], &entries),
            vec![entries[1].clone()]
        );
    }

    #[test]
    fn tcp_other_family_and_tcp_only_services_are_untouched() {
        let snap = dns(vec![ep("10.180.0.2", 53, None)]);
        let mut tcp = flow("172.30.0.10", 53, "10.180.0.1", 44000);
        tcp.protocol = TCP;
        let mut v6 = flow("fd00:10:96::10", 53, "fd00::1", 44001);
        v6.family = IpFamily::V6;
        // A TCP-only Service's address with a UDP flow to it: not a UDP frontend.
        let mut snap2 = snap.clone();
        let web = port("ns4", "web", "", Protocol::Tcp, "172.30.0.40", 80);
        let s = state(web, vec![ep("10.180.4.4", 80, None)]);
        snap2.services.insert(s.port.name.clone(), s);
        let udp_to_tcp_svc = flow("172.30.0.40", 80, "172.30.0.40", 44002);
        let entries = vec![tcp, v6, udp_to_tcp_svc];
        assert_eq!(stale_udp_entries(&snap2, &[], &entries), vec![]);
        // An IPv6 snapshot ignores IPv4 entries even on a port-only (AllLocal) NodePort match.
        let mut net6 = network(IpFamily::V6, &["2001:db8::1"], &[], &["fd00:10:96::/112"]);
        net6.node_port_ips = NodePortIps::AllLocal;
        let mut p = port("ns1", "dns", "dns", Protocol::Udp, "fd00:10:96::10", 53);
        p.node_port = Some(30053);
        let snap6 = snapshot(net6, vec![state(p, vec![ep("fd00::2", 53, None)])]);
        let v4_np = flow("192.168.0.2", 30053, "10.180.0.1", 44003);
        let v6_np = ConntrackEntry {
            family: IpFamily::V6,
            orig_src: ip("2001:db8::9"),
            orig_dst: ip("2001:db8::1"),
            reply_src: ip("fd00::1"),
            ..v4_np.clone()
        };
        assert_eq!(
            stale_udp_entries(&snap6, &[], &[v4_np, v6_np.clone()]),
            vec![v6_np]
        );
    }

    #[test]
    fn cleanup_is_needed_for_full_syncs_and_changed_or_deleted_udp_services() {
        let snaps = vec![dns(two_endpoints())];
        let key = |ns: &str, n: &str| ServiceKey {
            namespace: ns.to_string(),
            name: n.to_string(),
        };
        assert!(cleanup_needed(&Changed::All, &snaps, &[]));
        assert!(cleanup_needed(
            &Changed::Services([key("ns2", "other")].into()),
            &snaps,
            &[]
        ));
        // A Service with TCP ports only cannot make anything stale, nor can a deleted one
        // that had no UDP port.
        let mut with_web = snaps.clone();
        let web = port("ns4", "web", "", Protocol::Tcp, "172.30.0.40", 80);
        let s = state(web.clone(), vec![]);
        with_web[0].services.insert(s.port.name.clone(), s);
        let changed = Changed::Services([key("ns4", "web"), key("ns9", "gone")].into());
        assert!(!cleanup_needed(&changed, &with_web, &[web]));
        assert!(cleanup_needed(&changed, &with_web, &[dns_port()]));
        assert!(!cleanup_needed(
            &Changed::Services(BTreeSet::new()),
            &snaps,
            &[]
        ));
    }
}
