//! Root tests: each scenario's plan programmed for real into a network namespace the test
//! creates and always deletes (nft tables, iptables chains in both backends), read back with
//! the real tools, parsed, and checked: the read-back equals what the plan programmed, the
//! views round-trip through JSON, and every scenario packet traces to its verdict. For ebpf:
//! the scenario's family's maps (IPv4 or IPv6) pinned on a private bpffs mount, written with
//! the dataplane's map writer from the plan's operations, read back from the pins (equal to
//! the plan; the other family's maps pinned and empty), and every packet traced through them
//! as through the plan. Skips (saying why) when not root or a tool is missing.
use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};

use super::nft::parse_listing;
use super::scenario_tests::{as_save, expected, packet, program};
use super::view::{Inspected, from_iptables, from_nft};
use super::{iptables_trace, nft_trace};
use crate::model::scenario_fixture::{scenario_files, scenario_snapshot, scenarios};
use crate::plan::iptables::tracer::Tracer;

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("shinsp-{tag}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        Netns(name)
    }
    fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn has(tool: &str) -> bool {
    // `ip` knows only -V, the iptables tools and nft take --version.
    ["--version", "-V"].iter().any(|flag| {
        Command::new(tool)
            .arg(flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn skip(tools: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root to create a network namespace".into());
    }
    tools
        .iter()
        .find(|t| !has(t))
        .map(|t| format!("{t} is not installed"))
}

fn round_trip(doc: &Inspected) {
    let json = serde_json::to_string(doc).unwrap();
    assert_eq!(&serde_json::from_str::<Inspected>(&json).unwrap(), doc);
}

#[test]
fn nft_tables_read_back_equal_the_plan_and_trace_every_packet() {
    if let Some(why) = skip(&["ip", "nft"]) {
        eprintln!("skipping: {why}");
        return;
    }
    let Some(files) = scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    let mut traced = 0;
    for file in files {
        for sc in scenarios(&file) {
            let id = sc["id"].as_str().unwrap();
            let (snap, local) = scenario_snapshot(&sc);
            let prog = program(&snap, &local);
            let ns = Netns::new("nft");
            let rs = crate::plan::nft::ruleset(&snap);
            let tx =
                crate::plan::nft::tx::full(std::slice::from_ref(&rs), &Default::default(), false);
            ns.run(
                &["nft", "-f", "-"],
                Some(&crate::plan::nft::text::to_text(&tx)),
            );
            let fam = snap.network.family;
            let listing = ns.run(&["nft", "list", "table", fam.nft(), "shunt"], None);
            let mut tables = parse_listing(&listing).unwrap_or_else(|e| panic!("{id}: {e}"));
            let kernel = tables.remove(&fam).expect("our table");
            assert_eq!(
                kernel, prog.nft,
                "{id}: nft list output parses to what the plan programmed"
            );
            let doc = Inspected {
                mode: "nftables".into(),
                families: vec![from_nft(fam, &kernel)],
            };
            round_trip(&doc);
            assert_eq!(doc.families[0], from_nft(fam, &prog.nft), "{id}");
            for pv in sc["packets"].as_array().into_iter().flatten() {
                let p = packet(pv);
                assert_eq!(
                    nft_trace(&kernel, &local, &p).unwrap(),
                    expected(&pv["expect"]),
                    "{id} :: {}",
                    pv["name"]
                );
                traced += 1;
            }
        }
    }
    eprintln!("nftables: traced {traced} scenario packets through read-back tables");
    assert!(traced >= 39);
}

#[test]
fn iptables_chains_read_back_in_both_backends_and_trace_every_packet() {
    let Some(files) = scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    for backend in ["legacy", "nft"] {
        let (restore, save4, save6) = (
            format!("iptables-{backend}-restore"),
            format!("iptables-{backend}-save"),
            format!("ip6tables-{backend}-save"),
        );
        if let Some(why) = skip(&["ip", &restore, &save4, &save6]) {
            eprintln!("skipping the {backend} backend: {why}");
            continue;
        }
        let mut traced = 0;
        for file in &files {
            for sc in scenarios(file) {
                let id = sc["id"].as_str().unwrap();
                let (snap, local) = scenario_snapshot(&sc);
                let prog = program(&snap, &local);
                let fam = snap.network.family;
                let (restore, save) = match fam {
                    crate::model::IpFamily::V4 => {
                        (format!("iptables-{backend}-restore"), save4.clone())
                    }
                    crate::model::IpFamily::V6 => {
                        (format!("ip6tables-{backend}-restore"), save6.clone())
                    }
                };
                let ns = Netns::new("ipt");
                let irs = crate::plan::iptables::build(&snap);
                let text = crate::plan::iptables::render(
                    &irs,
                    crate::plan::iptables::RenderScope::Full {
                        existing: &BTreeSet::new(),
                    },
                )
                .text;
                ns.run(&[&restore, "--noflush"], Some(&text));
                for j in crate::plan::iptables::jump_rules() {
                    let tool = restore.trim_end_matches("-restore");
                    let mut args: Vec<&str> = vec![tool, "-t", j.table.as_str(), "-A", j.chain];
                    args.extend(j.args.iter().map(String::as_str));
                    ns.run(&args, None);
                }
                let saved = ns.run(&[&save], None);
                let kernel =
                    Tracer::from_save(&saved, &local).unwrap_or_else(|e| panic!("{id}: {e}"));
                let doc = Inspected {
                    mode: "iptables".into(),
                    families: vec![from_iptables(fam, kernel.chains())],
                };
                round_trip(&doc);
                assert_eq!(
                    doc.families[0],
                    from_iptables(fam, prog.iptables.chains()),
                    "{backend} {id}: iptables-save output shows what the plan programmed"
                );
                // The plan as a save-like document loads the same chains.
                let planned = Tracer::from_save(
                    &as_save(&text, &crate::plan::iptables::jump_rules()),
                    &local,
                )
                .unwrap();
                assert_eq!(
                    kernel.chains().keys().collect::<Vec<_>>(),
                    planned.chains().keys().collect::<Vec<_>>(),
                    "{backend} {id}: chains"
                );
                for pv in sc["packets"].as_array().into_iter().flatten() {
                    let p = packet(pv);
                    assert_eq!(
                        iptables_trace(&kernel, &p).unwrap(),
                        expected(&pv["expect"]),
                        "{backend} {id} :: {}",
                        pv["name"]
                    );
                    traced += 1;
                }
            }
        }
        eprintln!(
            "iptables {backend}: traced {traced} scenario packets through iptables-save output"
        );
        assert!(traced >= 39);
    }
}

/// A private bpffs mount, unmounted (and its directory removed) on drop.
struct Bpffs(tempfile::TempDir);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Family `F`'s plan of `snap` written with the dataplane's map writer into a fresh object
/// pinned under `pins` (the object dropped afterwards: the pins keep the maps, as after
/// shunt exits); returns the planned content.
fn pin_plan<F: crate::dataplane::ebpf::KernelFamily + super::ebpf::Fam>(
    snap: &crate::model::Snapshot,
    local: &[std::net::IpAddr],
    pins: &std::path::Path,
) -> crate::plan::ebpf::State<F> {
    let (planned, ops) = super::scenario_tests::program_ebpf::<F>(snap, local);
    let mut ebpf = crate::dataplane::ebpf::load_object(Some(pins)).expect("load");
    crate::dataplane::ebpf::apply_ops::<F>(&mut ebpf, &ops).expect("write maps");
    planned
}

#[test]
fn ebpf_maps_read_back_from_pins_equal_the_plan() {
    use crate::model::IpFamily;
    use crate::plan::ebpf::{V4, V6};
    if let Some(why) = skip(&["mount"]) {
        eprintln!("skipping: {why}");
        return;
    }
    let Some(files) = scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    let mut checked = [0, 0];
    let mut traced = 0;
    for file in files {
        for sc in scenarios(&file) {
            let id = sc["id"].as_str().unwrap();
            let (snap, local) = scenario_snapshot(&sc);
            let prog = program(&snap, &local);
            let mnt = Bpffs(tempfile::tempdir().unwrap());
            let st = Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(mnt.0.path())
                .status()
                .unwrap();
            assert!(st.success(), "mount bpffs");
            let pins = mnt.0.path().join("shunt");
            std::fs::create_dir(&pins).unwrap();
            let fam = snap.network.family;
            match fam {
                IpFamily::V4 => {
                    pin_plan::<V4>(&snap, &local, &pins);
                }
                IpFamily::V6 => {
                    pin_plan::<V6>(&snap, &local, &pins);
                }
            }
            let back = super::read::read_ebpf_state(&pins).unwrap_or_else(|e| panic!("{id}: {e}"));
            // The object declares both families' maps: the other one is pinned, and empty.
            let planned = &prog.ebpf;
            match fam {
                IpFamily::V4 => {
                    assert_eq!(
                        back.v4, planned.v4,
                        "{id}: IPv4 maps read back from the pins"
                    );
                    assert_eq!(back.v6, Some(Default::default()), "{id}: IPv6 maps empty");
                }
                IpFamily::V6 => {
                    assert_eq!(
                        back.v6, planned.v6,
                        "{id}: IPv6 maps read back from the pins"
                    );
                    assert_eq!(back.v4, Some(Default::default()), "{id}: IPv4 maps empty");
                }
            }
            let doc = Inspected {
                mode: "ebpf".into(),
                families: back.views(),
            };
            round_trip(&doc);
            assert_eq!(
                back.view_of(fam),
                planned.view_of(fam),
                "{id}: the view of the pins is the view of the plan"
            );
            let host = super::ebpf::Host {
                local: local.clone(),
                loopback_attached: true,
            };
            for pv in sc["packets"].as_array().into_iter().flatten() {
                let p = packet(pv);
                assert_eq!(
                    back.trace(&host, &p).unwrap(),
                    planned.trace(&host, &p).unwrap(),
                    "{id} :: {}: the pins trace like the plan",
                    pv["name"]
                );
                traced += 1;
            }
            assert!(super::read::read_ebpf_conntrack(&pins).unwrap().is_empty());
            let counters = super::read::read_ebpf_counters(&pins).unwrap();
            assert_eq!(counters.len(), shunt_abi::stat::COUNT as usize);
            checked[usize::from(fam == IpFamily::V6)] += 1;
        }
    }
    eprintln!(
        "ebpf: {} IPv4 and {} IPv6 scenarios read back from pins, {traced} packets traced",
        checked[0], checked[1]
    );
    assert!(checked[0] >= 4 && checked[1] >= 1, "{checked:?}");
}
