#!/usr/bin/env bash
# Two hosts as network namespaces, A (10.77.0.1) and B (10.77.0.2), joined
# by a veth pair; nothing else is connected, nothing leaves the machine.
# B runs an HBONE server and a plain TCP echo app on 8080 that records who
# connects; A runs `hbone node` capturing 10.77.0.2 (all ports), and a plain
# client (python3, no proxy settings) dials 10.77.0.2:8080.
# Prints key=value lines for tests/capture.rs to judge; exits non-zero on
# a failure it can tell itself.
# Usage: capture.sh HBONE_BIN WORKDIR [FIREWALL]
# (WORKDIR holds ca/, server/ and client/; FIREWALL is the nodes'
# --firewall, nftables or iptables, nftables when not given.)
set -euo pipefail
bin=$1
work=$2
firewall=${3:-nftables}
tag=$$
a=hbone-capa-$tag
b=hbone-capb-$tag
server_id=spiffe://cluster.local/ns/demo/sa/server

source "$(dirname "$0")/lib.sh"

# How many copies of hbone's rules namespace NS holds: its nftables tables,
# or its iptables jumps and chains in each TABLE given (both families),
# printed as one number when they agree, else all of them.
# Usage: rule_copies NS TABLE...
rule_copies() {
    local ns=$1 counts=() listing
    shift
    if [ "$firewall" = nftables ]; then
        ip netns exec "$ns" nft list tables | grep -c 'inet hbone' || true
        return
    fi
    for prog in iptables ip6tables; do
        for table in "$@"; do
            local chain=HBONE-OUTPUT hook=OUTPUT
            [ "$table" = filter ] && chain=HBONE-INPUT hook=INPUT
            listing=$(ip netns exec "$ns" "$prog" -w -t "$table" -S)
            counts+=("$(grep -c -- "^-A $hook -j $chain\$" <<<"$listing" || true)")
            counts+=("$(grep -c -- "^-N $chain\$" <<<"$listing" || true)")
        done
    done
    if [ "$(printf '%s\n' "${counts[@]}" | sort -u | wc -l)" = 1 ]; then
        echo "${counts[0]}"
    else
        echo "${counts[*]}"
    fi
}

# The packet count of the rule in CHAIN (of TABLE) whose line matches
# PATTERN. Usage: rule_packets NS TABLE CHAIN PATTERN [ip6]
rule_packets() {
    local ns=$1 table=$2 chain=$3 pattern=$4 prog=iptables
    [ "${5:-}" = ip6 ] && prog=ip6tables
    if [ "$firewall" = nftables ]; then
        ip netns exec "$ns" nft list chain inet hbone "$chain" | grep -E -- "$pattern" \
            | grep -o 'packets [0-9]*' | cut -d' ' -f2
    else
        ip netns exec "$ns" "$prog" -w -t "$table" -L "$chain" -v -x -n \
            | grep -E -- "$pattern" | awk '{ print $1 }'
    fi
}

add_ns "$a"
add_ns "$b"
ip -n "$a" link add va type veth peer name vb netns "$b"
ip -n "$a" addr add 10.77.0.1/24 dev va
ip -n "$b" addr add 10.77.0.2/24 dev vb
# IPv6 too (nodad: usable at once, no duplicate address detection wait).
ip -n "$a" addr add fd77::1/64 dev va nodad
ip -n "$b" addr add fd77::2/64 dev vb nodad
ip -n "$a" link set va up
ip -n "$b" link set vb up

# B: the echo app, recording each peer address, and the HBONE server.
echo_app "$b" "$work/app.log" 10.77.0.2 fd77::2
ip netns exec "$b" "$bin" server --identity-dir "$work/server" --listen '[::]:15008' \
    --allow-target 10.77.0.2/32:8080 --allow-target '[fd77::2/128]:8080' \
    --log info > "$work/server.log" 2>&1 &
server=$!
pids+=($server)
wait_for "$work/app.log" listening
wait_for "$work/server.log" "ready"

# Every port of B, 15008 included: the node's own connections to B pass
# only by their socket mark.
# A's own address is in the mesh too: the rules must not tunnel it to itself.
# One listener on [::] takes both families.
node_args=(--identity-dir "$work/client" --listen '[::]:15001'
    --mesh 10.77.0.2/32 --mesh 10.77.0.1/32 --mesh '[fd77::2/128]'
    --peer "10.77.0.2/32=$server_id" --peer "10.77.0.1/32=$server_id"
    --peer "fd77::2/128=$server_id" --log info --firewall "$firewall")

# The rules applied twice leave one copy (as after a crash, or a restart):
# the nft script replaces the table rather than adding another; the node
# on iptables refills its chains and adds a jump only where there is none,
# which two starts ended with kill -9 try.
if [ "$firewall" = nftables ]; then
    "$bin" node "${node_args[@]}" --print-rules > "$work/rules.nft"
    ip netns exec "$a" nft -f "$work/rules.nft"
    ip netns exec "$a" nft -f "$work/rules.nft"
else
    for try in 1 2; do
        ip netns exec "$a" "$bin" node "${node_args[@]}" > "$work/node-crashed-$try.log" 2>&1 &
        crashed=$!
        pids+=($crashed)
        wait_for "$work/node-crashed-$try.log" "node ready"
        kill -KILL "$crashed"
        wait "$crashed" || true
    done
fi
echo "tables_after_two_applies=$(rule_copies "$a" nat)"

# A: the node, sandboxed as by default: it must still run nft to install,
# and later remove, its rules. Its probe tries the server's key, which it was
# not given.
ip netns exec "$a" env HBONE_SANDBOX_PROBE="$work/server/key.pem" \
    "$bin" node "${node_args[@]}" --admin 127.0.0.1:15020 \
    > "$work/node.log" 2>&1 &
node=$!
pids+=($node)
wait_for "$work/node.log" "node ready"
echo "tables_while_running=$(rule_copies "$a" nat)"

# Packets a redirect rule caught (its counter). Args: its address, and ip6
# for an IPv6 one.
redirected() {
    if [ "$firewall" = nftables ]; then
        rule_packets "$a" nat output "daddr $1 "
    else
        rule_packets "$a" nat HBONE-OUTPUT " $1(/128)? +redir" "${2:-}"
    fi
}
ip netns exec "$a" timeout 20 python3 -c "$client" 10.77.0.2 ""
echo "redirect_packets=$(redirected 10.77.0.2)"
wait_for "$work/node.log" "target_addr=10.77.0.2:8080"
wait_for "$work/server.log" "target_addr=10.77.0.2:8080"
ip netns exec "$a" timeout 20 python3 -c "$client" fd77::2 v6_
echo "v6_redirect_packets=$(redirected fd77::2 ip6)"
wait_for "$work/node.log" "target_addr=\[fd77::2\]:8080"
wait_for "$work/server.log" "target_addr=\[fd77::2\]:8080"

# A connection to A's own address stays on A, plain.
ip netns exec "$a" timeout 20 python3 -c '
import socket
s = socket.socket(); s.bind(("10.77.0.1", 9090)); s.listen(1)
c = socket.create_connection(("10.77.0.1", 9090), timeout=10)
a, peer = s.accept()
a.sendall(b"local"); a.close()
print("local_reply=%s" % c.recv(100).decode())
'

# A renewed certificate is picked up on SIGHUP, as by the other commands.
"$bin" ca issue --ca "$work/ca" --id spiffe://cluster.local/ns/demo/sa/client \
    --out "$work/client" > /dev/null
kill -HUP "$node"
wait_for "$work/node.log" "identity reloaded"

# A destination redirected to the node but in no peer network (an
# administrator's rule gone wrong) is closed, not sent in the clear.
if [ "$firewall" = nftables ]; then
    ip netns exec "$a" nft add rule inet hbone output ip daddr 10.77.0.3 tcp dport 80 \
        redirect to :15001
else
    ip netns exec "$a" iptables -w -t nat -A HBONE-OUTPUT -d 10.77.0.3 -p tcp --dport 80 \
        -j REDIRECT --to-ports 15001
fi
ip netns exec "$a" timeout 20 python3 -c '
import socket
c = socket.create_connection(("10.77.0.3", 80), timeout=10)
c.sendall(b"hello")
try:
    got = c.recv(100)
except ConnectionResetError:
    got = b""
print("unknown_destination_echoed=%d" % len(got))
'
wait_for "$work/node.log" "unknown_destination"
# ... and counted as Istio counts a tunnel with no route.
ip netns exec "$a" curl -s --max-time 5 http://127.0.0.1:15020/metrics > "$work/metrics.txt"
echo "no_route_counted=$(grep -c 'response_flags="NR"' "$work/metrics.txt" || true)"

# SIGTERM: the node removes its table and exits.
kill -TERM "$node"
for _ in $(seq 100); do kill -0 "$node" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$node" 2>/dev/null; then echo "node still running 10 s after SIGTERM"; exit 1; fi
status=0
wait "$node" || status=$?
echo "node_exit=$status"
echo "tables_after_exit=$(rule_copies "$a" nat filter)"

# Inbound: B protects its app's port. Plaintext from A (whose node is gone,
# so nothing captures it) is refused; HBONE to B's server still reaches the
# app, which the server dials from B itself.
echo "inbound-checks" >> "$work/app.log"
client_id=spiffe://cluster.local/ns/demo/sa/client
plain='
import socket, sys
try:
    c = socket.create_connection(("10.77.0.2", 8080), timeout=10)
    c.sendall(b"plain")
    c.shutdown(socket.SHUT_WR)
    got = c.recv(100)
    print("%s=%s" % (sys.argv[1], "echoed" if got == b"plain" else "closed"))
except (ConnectionRefusedError, ConnectionResetError):
    print("%s=refused" % sys.argv[1])
'
# Packets the protecting rule counted.
protected_packets() {
    if [ "$firewall" = nftables ]; then
        rule_packets "$b" filter input "dport 8080"
    else
        rule_packets "$b" filter HBONE-INPUT "dpt:8080"
    fi
}
# The node's metric of the same count, once it shows one connection (the
# node reads the firewall's counter every few seconds). Arg: the mode.
plaintext_metric() {
    for _ in $(seq 150); do
        line=$(ip netns exec "$b" curl -s "http://127.0.0.1:15000/metrics" \
            | grep "^hbone_inbound_plaintext_connections_total{mode=\"$1\"}" || true)
        [ "${line##* }" = 1 ] && break
        sleep 0.1
    done
    echo "${line##* }"
}
# Strict: `hbone node` beside B's `hbone server`. Permissive: one
# `hbone run` holding both, as a VM in the mesh runs.
cat > "$work/b.toml" <<TOML
[server]
identity-dir = "$work/server"
listen = "[::]:15008"
allow-target = ["10.77.0.2/32:8080"]

[node]
identity-dir = "$work/server"
listen = "127.0.0.1:15001"
mesh = ["10.77.0.1/32"]
peer = ["10.77.0.1/32=$client_id"]
protect = ["8080"]
inbound = "permissive"
firewall = "$firewall"
TOML
for mode in strict permissive; do
    if [ "$mode" = strict ]; then
        ip netns exec "$b" "$bin" node --identity-dir "$work/server" --listen 127.0.0.1:15001 \
            --mesh 10.77.0.1/32 --peer "10.77.0.1/32=$client_id" --protect 8080 \
            --inbound "$mode" --log info --admin 127.0.0.1:15000 --firewall "$firewall" \
            > "$work/bnode-$mode.log" 2>&1 &
    else
        kill -TERM "$server"
        wait "$server" || true
        ip netns exec "$b" "$bin" run --config "$work/b.toml" --admin 127.0.0.1:15000 --log info \
            > "$work/bnode-$mode.log" 2>&1 &
    fi
    bnode=$!
    pids+=($bnode)
    wait_for "$work/bnode-$mode.log" "node ready"
    [ "$mode" = strict ] || wait_for "$work/bnode-$mode.log" "HBONE server ready"
    ip netns exec "$a" timeout 20 python3 -c "$plain" "${mode}_plaintext"
    echo "${mode}_counted=$(protected_packets)"
    echo "${mode}_metric=$(plaintext_metric "$mode")"
    echo "${mode}_tunnelled=$(printf tunnelled | ip netns exec "$a" timeout 20 "$bin" connect \
        --identity-dir "$work/client" --server 10.77.0.2:15008 --server-id "$server_id" \
        --target 10.77.0.2:8080 2>>"$work/connect.log")"
    echo "${mode}_tables=$(rule_copies "$b" nat filter)"
    # The first node dies without a chance to clean up (kill -9): its
    # table stays until the next start replaces it; the second exits
    # cleanly and removes it.
    signal=TERM
    [ "$mode" = strict ] && signal=KILL
    kill "-$signal" "$bnode"
    for _ in $(seq 100); do kill -0 "$bnode" 2>/dev/null || break; sleep 0.1; done
    status=0
    wait "$bnode" || status=$?
    echo "${mode}_node_exit=$status"
    echo "${mode}_tables_after=$(rule_copies "$b" nat filter)"
done
