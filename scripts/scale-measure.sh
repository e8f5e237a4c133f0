#!/usr/bin/env bash
# Measures shunt at scale in a network namespace of its own (deleted on exit):
# cold sync time (start to /healthz 200), the time to apply one endpoint change (manifest
# write to the kernel carrying the new endpoint, checked with `nft list` in nftables mode,
# `iptables -S` of svc0's service chain in iptables mode and `bpftool map dump` of the pinned
# backend map in ebpf mode), and peak RSS.
# Usage: scripts/scale-measure.sh [SERVICES] [ENDPOINTS] [MODE]   (needs root)
# SHUNT_ARGS adds arguments to shunt's command line, e.g. SHUNT_ARGS=--iptables-backend=legacy.
set -euo pipefail
services=${1:-10000}
endpoints=${2:-10}
mode=${3:-nftables}
if [ "$mode" = ebpf ] && ! command -v bpftool >/dev/null; then
    echo "ebpf mode needs bpftool to read the pinned maps (apt-get install bpftool)" >&2
    exit 1
fi
read -r -a extra <<<"${SHUNT_ARGS:-}"
# The save tool of the backend shunt was told to use (iptables-save follows the system's choice).
save=iptables-save
case "${SHUNT_ARGS:-}" in
*iptables-backend*legacy*) save=iptables-legacy-save ;;
*iptables-backend*nft*) save=iptables-nft-save ;;
esac
top=$(cd "$(dirname "$0")/.." && pwd)
shunt="${CARGO_TARGET_DIR:-$top/target}/release/shunt"
ns="shunt-scale-$$"
dir=$(mktemp -d)
pid=""
cg=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    # ebpf mode: the pins lived in shunt's own bpffs instance, gone with its mount namespace.
    [ -x "$shunt" ] && [ "$mode" != ebpf ] && ip netns exec "$ns" "$shunt" --proxy-mode "$mode" "${extra[@]}" --cleanup >/dev/null 2>&1 || true
    [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

(cd "$top" && cargo build --release -p shunt --quiet)
python3 "$top/scripts/scale-manifests.py" "$dir" --services "$services" --endpoints "$endpoints" --node scale-node
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add uplink0 type veth peer name uplink1
ip -n "$ns" addr add 192.168.0.2/24 dev uplink0
ip -n "$ns" link set uplink0 up && ip -n "$ns" link set uplink1 up

# How shunt enters the namespace. ebpf mode needs the cgroup2 mount, which `ip netns exec`
# hides (it remounts /sys), and must not share /sys/fs/bpf/shunt with anything else on the
# machine: it joins the network namespace with nsenter and a mount namespace of its own
# with a fresh bpffs on /sys/fs/bpf, and its socket programs go to a cgroup of this run.
launch=(ip netns exec "$ns")
if [ "$mode" = ebpf ]; then
    cgmount=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
    cg="$cgmount/shunt-scale-$$"
    mkdir "$cg"
    extra+=(--cgroup-root "$cg")
    launch=(nsenter --net="/run/netns/$ns" unshare --mount --propagation private
        sh -c 'mount -t bpf bpf /sys/fs/bpf && exec "$@"' sh)
fi
now_ms() { date +%s%3N; }
t0=$(now_ms)
"${launch[@]}" "$shunt" --proxy-mode "$mode" --manifests "$dir" --hostname-override scale-node \
    --detect-local-mode ClusterCIDR --cluster-cidr 10.0.0.0/8 --nodeport-addresses 192.168.0.2/32 \
    --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 "${extra[@]}" 2>"$dir/shunt.log" &
pid=$!
for _ in $(seq 1 6000); do
    code=$(ip netns exec "$ns" curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:10256/healthz || true)
    [ "$code" = 200 ] && break
    sleep 0.05
done
[ "$code" = 200 ] || { echo "shunt never became healthy"; tail -20 "$dir/shunt.log"; exit 1; }
t1=$(now_ms)
echo "cold sync ($services services x $endpoints endpoints, $mode ${SHUNT_ARGS:-}: $((t1 - t0)) ms to /healthz 200"

svc_chain=""
pick_map=""
if [ "$mode" = nftables ]; then
# The service chain of svc0 (name hashed as kube-proxy does) picks its endpoint through one
# of the endpoint-pick maps (chosen by a hash of the chain's name, see
# proxy/src/plan/nft/names.rs): that map must name the new endpoint's chain. Listing one map
# still makes nft load the table's cache, so the figure includes that cost.
svc_chain=$(ip netns exec "$ns" nft -j list chains ip | python3 -c '
import json,sys
for o in json.load(sys.stdin)["nftables"]:
    c=o.get("chain")
    if c and c["name"].startswith("service-") and c["name"].endswith("-scale/svc0/tcp/http"):
        print(c["name"]); break')
pick_map=$(python3 -c '
import hashlib,sys
d=hashlib.sha256(sys.argv[1].encode()).digest()
print("endpoint-picks-%03x" % (int.from_bytes(d[4:8], "big") % 1024))' "$svc_chain")
fi
# ebpf mode: bpftool reads the pins from inside shunt's mount namespace (nsenter, unshare
# and sh all exec, so $pid is shunt). The backend map's value is Backend4 {addr, port, proto,
# flags} in wire order: 10.127.255.254 is "0a 7f ff fe".
be_map=/sys/fs/bpf/shunt/SHUNT_BE4
if [ "$mode" = ebpf ]; then
    n=$(nsenter --target "$pid" --mount --net bpftool map dump pinned "$be_map" | grep -c '^key' || true)
    echo "ebpf: $n backends in $be_map"
    # The maps' sizes after the cold sync (they grow when the cluster needs more entries).
    for m in SHUNT_SVC4 SHUNT_BE4 SHUNT_REVNAT4 SHUNT_CIP4 SHUNT_CT4; do
        printf 'ebpf: %s max_entries %s\n' "$m" "$(nsenter --target "$pid" --mount --net bpftool map show pinned "/sys/fs/bpf/shunt/$m" | sed -n 's/.*max_entries \([0-9]*\).*/\1/p')"
    done
fi
if [ "$mode" = iptables ]; then
# svc0's SHUNT-SVC-* chain (the target of its cluster IP rule) gets the new endpoint's jump
# in the same transaction as the endpoint's DNAT chain. Polling that one chain (`-S CHAIN`)
# instead of the whole table keeps the poll cheap: iptables-nft-save of 10,000 Services takes
# ~6 s (iptables-nft fetches only the named chain for `-S CHAIN`).
svc_chain=$(ip netns exec "$ns" "$save" -t nat | awk '!c && /^-A SHUNT-SERVICES .*"scale\/svc0:http cluster IP"/ { c = $NF } END { print c }')
[ -n "$svc_chain" ] || { echo "svc0's service chain not found"; exit 1; }
list="${save%-save}"
fi
# One endpoint change: svc0 gets a new endpoint 10.127.255.254.
python3 - "$dir/services-000.json" <<'PY'
import json, os, sys
p = sys.argv[1]
d = json.load(open(p))
for it in d["items"]:
    if it["kind"] == "EndpointSlice" and it["metadata"]["name"] == "svc0-1":
        it["endpoints"].append({"addresses": ["10.127.255.254"], "conditions": {"ready": True}, "nodeName": "other-node"})
tmp = p + ".tmp"
json.dump(d, open(tmp, "w"))
os.rename(tmp, p)
PY
t2=$(now_ms)
found=0
for _ in $(seq 1 600); do
    if [ "$mode" = ebpf ]; then
        # The dump of every backend makes each poll cost what bpftool costs at this size.
        if nsenter --target "$pid" --mount --net bpftool map dump pinned "$be_map" 2>/dev/null | grep 'value: 0a 7f ff fe' >/dev/null; then found=1; break; fi
    elif [ "$mode" = nftables ]; then
        # (No `grep -q`: under pipefail its early exit can kill the lister with SIGPIPE.)
        if ip netns exec "$ns" nft list map ip shunt "$pick_map" 2>/dev/null | grep '__10.127.255.254/' >/dev/null; then found=1; break; fi
    else
        # The rule jumping to the new endpoint's chain names the endpoint in its comment.
        if ip netns exec "$ns" "$list" -w -t nat -S "$svc_chain" 2>/dev/null | grep -- '-> 10.127.255.254:' >/dev/null; then found=1; break; fi
    fi
    sleep 0.02
done
t3=$(now_ms)
[ "$found" = 1 ] || { echo "endpoint change never reached the kernel"; tail -20 "$dir/shunt.log"; exit 1; }
echo "one endpoint change: $((t3 - t2)) ms from manifest write to the endpoint (chain, or backend map entry) in the kernel (includes the file watcher's 100 ms debounce and this script's polling)"
metrics=$(ip netns exec "$ns" curl -s http://127.0.0.1:10249/metrics)
echo "$metrics" | grep -E '^kubeproxy_sync_(full|partial)_proxy_rules_duration_seconds_(sum|count)' || true
echo "peak RSS: $(grep VmHWM /proc/$pid/status | awk '{print $2/1024 " MiB"}'), now $(grep VmRSS /proc/$pid/status | awk '{print $2/1024 " MiB"}')"
