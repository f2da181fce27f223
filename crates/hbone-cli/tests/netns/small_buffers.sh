#!/usr/bin/env bash
# Runs inside a fresh network namespace (unshare -n): only `lo`, nothing
# reaches outside. Caps TCP socket buffers at 256 KiB in this namespace
# (the host's stay as they are), so the HTTP/2 connection's socket fills
# often, then moves bulk data through one process holding an HBONE server
# and a forward entry, several times. A transfer whose bytes were left
# behind in a buffer waits for the next keepalive (10 s) to move again.
# Prints one line per transfer: seconds=S bytes=B.
# Usage: small_buffers.sh HBONE_BIN WORKDIR   (WORKDIR holds server/ and client/)
set -euo pipefail
bin=$1
work=$2
server_id=spiffe://cluster.local/ns/demo/sa/server

ip link set lo up
# /proc/sys/net is this namespace's own.
echo "4096 131072 262144" > /proc/sys/net/ipv4/tcp_rmem
echo "4096 16384 262144" > /proc/sys/net/ipv4/tcp_wmem
[ "$(cut -f3 /proc/sys/net/ipv4/tcp_rmem)" = 262144 ] || { echo "tcp_rmem not capped"; exit 1; }
# pids (killed on exit) and wait_for.
source "$(dirname "$0")/lib.sh"

"$bin" bench apps > "$work/apps.out" 2> "$work/apps.err" &
pids+=($!)
wait_for "$work/apps.out" sink=
sink=$(grep -o 'sink=[0-9.:]*' "$work/apps.out" | cut -d= -f2)
cat > "$work/run.toml" <<TOML
[server]
identity-dir = "$work/server"
listen = "127.0.0.1:15008"
[[forward]]
identity-dir = "$work/client"
listen = "127.0.0.1:9000"
server = "127.0.0.1:15008"
server-id = "$server_id"
target = "$sink"
TOML
"$bin" run --config "$work/run.toml" --admin off --log info > "$work/run.log" 2>&1 &
pids+=($!)
wait_for "$work/run.log" "forward ready"
for _ in 1 2 3 4 5 6; do
    timeout 30 "$bin" bench load --workload bulk --addr 127.0.0.1:9000 --duration 1s
done
