#!/usr/bin/env bash
# Three hosts as network namespaces: A (10.78.0.1) and G (10.78.0.2) on one
# network, G (10.78.1.1) and B (10.78.1.2) on another, each pair joined by a
# veth; the same in IPv6 (fd78::/64, fd78:1::/64). G forwards no packets,
# so A's only way to B is G's `hbone gateway`. Nothing leaves the machine.
# B runs an HBONE server and a plain TCP echo app on 8080; A runs
# `hbone node` capturing B's network as a remote one behind G, and a plain
# client (python3) dials B's app.
# Prints key=value lines for tests/capture_remote.rs to judge; exits
# non-zero on a failure it can tell itself.
# Usage: capture_remote.sh HBONE_BIN WORKDIR
#   (WORKDIR holds server/, client/ and gateway/)
set -euo pipefail
bin=$1
work=$2
tag=$$
a=hbone-rema-$tag
g=hbone-remg-$tag
b=hbone-remb-$tag
server_id=spiffe://cluster.local/ns/demo/sa/server
gateway_id=spiffe://cluster.local/ns/istio-system/sa/gateway

source "$(dirname "$0")/lib.sh"

for ns in "$a" "$g" "$b"; do add_ns "$ns"; done
ip -n "$a" link add va type veth peer name ga netns "$g"
ip -n "$g" link add gb type veth peer name vb netns "$b"
ip -n "$a" addr add 10.78.0.1/24 dev va
ip -n "$g" addr add 10.78.0.2/24 dev ga
ip -n "$g" addr add 10.78.1.1/24 dev gb
ip -n "$b" addr add 10.78.1.2/24 dev vb
# (nodad: usable at once, no duplicate address detection wait.)
ip -n "$a" addr add fd78::1/64 dev va nodad
ip -n "$g" addr add fd78::2/64 dev ga nodad
ip -n "$g" addr add fd78:1::1/64 dev gb nodad
ip -n "$b" addr add fd78:1::2/64 dev vb nodad
ip -n "$a" link set va up
ip -n "$g" link set ga up
ip -n "$g" link set gb up
ip -n "$b" link set vb up
# Routes through G both ways, and G refusing to forward: were the node to
# send anything straight to B, it would be dropped at G, not delivered.
ip -n "$a" route add 10.78.1.0/24 via 10.78.0.2
ip -n "$a" route add fd78:1::/64 via fd78::2
ip -n "$b" route add 10.78.0.0/24 via 10.78.1.1
ip -n "$b" route add fd78::/64 via fd78:1::1
ip netns exec "$g" sh -c 'echo 0 > /proc/sys/net/ipv4/ip_forward
    echo 0 > /proc/sys/net/ipv6/conf/all/forwarding'
echo "gateway_forwarding=$(ip netns exec "$g" cat /proc/sys/net/ipv4/ip_forward)"

# B: the echo app and the HBONE server.
echo_app "$b" "$work/app.log" 10.78.1.2 fd78:1::2
ip netns exec "$b" "$bin" server --identity-dir "$work/server" --listen '[::]:15008' \
    --allow-target 10.78.1.2/32:8080 --allow-target '[fd78:1::2/128]:8080' \
    --log info > "$work/server.log" 2>&1 &
pids+=($!)
wait_for "$work/app.log" listening
wait_for "$work/server.log" "ready"

# No path from A to B but the gateway: a plain connection goes nowhere.
ip netns exec "$a" timeout 20 python3 -c '
import socket
try:
    socket.create_connection(("10.78.1.2", 8080), timeout=2)
    print("direct_path=open")
except OSError:
    print("direct_path=none")
'

# G: the gateway, routing B's app addresses (as a capturing node asks for
# them) to B's HBONE server.
cat > "$work/routes.toml" <<TOML
[[route]]
host = "10.78.1.2"
port = 8080
endpoints = ["10.78.1.2"]

[[route]]
host = "[fd78:1::2]"
port = 8080
endpoints = ["[fd78:1::2]:15008"]
TOML
ip netns exec "$g" "$bin" gateway --identity-dir "$work/gateway" --listen '[::]:15008' \
    --routes "$work/routes.toml" --log info > "$work/gateway.log" 2>&1 &
pids+=($!)
wait_for "$work/gateway.log" "HBONE gateway ready"

# A: the node, B's networks remote behind G.
ip netns exec "$a" "$bin" node --identity-dir "$work/client" --listen '[::]:15001' \
    --mesh 10.78.1.0/24 --mesh '[fd78:1::/64]' \
    --peer "10.78.1.0/24=$server_id" --peer "fd78:1::/64=$server_id" \
    --remote "10.78.1.0/24=10.78.0.2:15008,$gateway_id" \
    --remote "fd78:1::/64=[fd78::2]:15008,$gateway_id" \
    --log info > "$work/node.log" 2>&1 &
node=$!
pids+=($node)
wait_for "$work/node.log" "node ready"

ip netns exec "$a" timeout 20 python3 -c "$client" 10.78.1.2 ""
wait_for "$work/node.log" "target_addr=10.78.1.2:8080"
wait_for "$work/server.log" "target_addr=10.78.1.2:8080"
ip netns exec "$a" timeout 20 python3 -c "$client" fd78:1::2 v6_
wait_for "$work/node.log" "target_addr=\[fd78:1::2\]:8080"
wait_for "$work/server.log" "target_addr=\[fd78:1::2\]:8080"

# The outer tunnels carry the node's pooled inner connections: the
# gateway records them once the node, stopping, closes those.
kill -TERM "$node"
for _ in $(seq 100); do kill -0 "$node" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$node" 2>/dev/null; then echo "node still running 10 s after SIGTERM"; exit 1; fi
status=0
wait "$node" || status=$?
echo "node_exit=$status"
wait_for "$work/gateway.log" "target_addr=10.78.1.2:8080"
wait_for "$work/gateway.log" "target_addr=\[fd78:1::2\]:8080"
