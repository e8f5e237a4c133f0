//! Arbitrary bytes as a manifest file -> the manifest parser -> the model -> every plan.
//!
//! The path a node's input takes in `--manifests` mode, minus the I/O: the bytes are parsed
//! as a YAML file and as a JSON file (the two parsers the directory source picks by file
//! name), every object is applied to a dual-stack `Tracker` on top of a valid Node and
//! ServiceCIDR (so Services are programmed, not only rejected), and after every applied
//! object the nftables transaction (full and partial, rendered to `nft -f` text), the
//! iptables-restore text (full and partial), the eBPF map contents (IPv4) and the stale UDP
//! conntrack decision are computed. Finally every object is deleted again, planning after
//! each delete. Any panic, overflow (debug build) or sanitizer report is a bug: invalid input
//! must become a skipped object with a reason, never a crash.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use shunt::model::{
    Changed, DetectLocal, IpFamily, NodeConfig, Object, ObjectRef, Snapshot, Tracker,
};
use shunt::plan::{conntrack, ebpf, iptables, nft};
use shunt::source::manifests::parse_bytes;

/// A valid Node and ServiceCIDR, applied before the fuzzed objects.
const BASE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels: {topology.kubernetes.io/zone: z1}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
  - {type: InternalIP, address: "2001:db8::2"}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [10.96.0.0/16, "fd00:96::/112"]}
"#;

fn config() -> NodeConfig {
    NodeConfig {
        node_name: "node-1".into(),
        families: vec![IpFamily::V4, IpFamily::V6],
        detect_local: DetectLocal::ClusterCidr(vec![
            "10.244.0.0/16".parse().expect("constant"),
            "fd00:10::/64".parse().expect("constant"),
        ]),
        masquerade_all: false,
        node_port_addresses: vec!["192.168.0.2/32".parse().expect("constant")],
    }
}

/// Every plan for the current snapshots; partial plans against `prev` when only some
/// Services changed.
struct Planner {
    prev_nft: Vec<nft::Ruleset>,
    prev_ipt: BTreeMap<IpFamily, iptables::Ruleset>,
    prev_ebpf: ebpf::State4,
    prev_snaps: Vec<Snapshot>,
}

impl Planner {
    fn plan(&mut self, tracker: &mut Tracker) {
        let update = tracker.take_update();
        let snaps = tracker.snapshots().to_vec();
        let rulesets: Vec<nft::Ruleset> = snaps.iter().map(nft::ruleset).collect();
        let full = nft::tx::full(&rulesets, &BTreeMap::new(), true);
        let _ = nft::text::to_text(&full);
        if let Changed::Services(changed) = &update.changed
            && let Ok(tx) = nft::tx::partial(&self.prev_nft, &rulesets, changed)
        {
            let _ = nft::text::to_text(&tx);
        }
        let none = BTreeSet::new();
        for snap in &snaps {
            let rs = iptables::build(snap);
            let _ = iptables::render(&rs, iptables::RenderScope::Full { existing: &none });
            if let (Changed::Services(changed), Some(prev)) =
                (&update.changed, self.prev_ipt.get(&snap.network.family))
            {
                let previous = prev.ownership();
                let _ = iptables::render(
                    &rs,
                    iptables::RenderScope::Partial {
                        services: changed,
                        previous: &previous,
                    },
                );
            }
            self.prev_ipt.insert(snap.network.family, rs);
            let _ = conntrack::stale_udp_entries(snap, &[], &[]);
            if snap.network.family == IpFamily::V4
                && let Ok(st) = ebpf::desired(snap, &[], &self.prev_ebpf)
            {
                let _ = ebpf::diff(&self.prev_ebpf, &st);
                let _ = ebpf::valid_pairs(&st);
                self.prev_ebpf = st;
            }
        }
        let deleted = conntrack::deleted_udp_ports(&self.prev_snaps, &snaps);
        for snap in &snaps {
            let _ = conntrack::stale_udp_entries(snap, &deleted, &[]);
        }
        self.prev_nft = rulesets;
        self.prev_snaps = snaps;
    }
}

fn run(objects: Vec<(ObjectRef, Object)>) {
    let mut tracker = Tracker::new(config());
    let (base, problems) = parse_bytes(Path::new("base.yaml"), BASE.as_bytes());
    assert!(problems.is_empty(), "{problems:?}");
    for (_, o) in base {
        tracker.apply(o).expect("base objects are valid");
    }
    let mut planner = Planner {
        prev_nft: Vec::new(),
        prev_ipt: BTreeMap::new(),
        prev_ebpf: ebpf::State4::default(),
        prev_snaps: Vec::new(),
    };
    planner.plan(&mut tracker);
    let mut applied = Vec::new();
    for (r, o) in objects {
        if tracker.apply(o).is_ok() {
            applied.push(r);
        }
        planner.plan(&mut tracker);
    }
    for r in applied.iter().rev() {
        tracker.delete(r);
        planner.plan(&mut tracker);
    }
}

fuzz_target!(|data: &[u8]| {
    for name in ["fuzz.yaml", "fuzz.json"] {
        let (objects, _problems) = parse_bytes(Path::new(name), data);
        run(objects);
    }
});
