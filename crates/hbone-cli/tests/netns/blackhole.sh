#!/usr/bin/env bash
# Runs inside a fresh network namespace (unshare -n): only `lo`, nothing
# reaches outside. Starts an HBONE server, a forward entry with a short
# keepalive and an echo app, opens a tunnel, then black-holes the server
# with iptables and reports how long the entry took to notice.
# Usage: blackhole.sh HBONE_BIN WORKDIR   (WORKDIR holds server/ and client/)
set -euo pipefail
bin=$1
work=$2
server_id=spiffe://cluster.local/ns/demo/sa/server

ip link set lo up
# Whatever happens, stop everything this script started.
pids=()
trap 'kill -KILL "${pids[@]}" 2>/dev/null || true' EXIT
# The test's backstop (timeout) sends TERM: clean up then too.
trap 'exit 1' TERM INT

# Waits up to 10 s for PATTERN in FILE; fails the script otherwise.
wait_for() {
    for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for '$2' in $1"; return 1
}
"$bin" bench apps > "$work/apps.out" 2> "$work/apps.err" &
pids+=($!)
"$bin" server --identity-dir "$work/server" --listen 127.0.0.1:15008 \
    --log info > "$work/server.log" 2>&1 &
pids+=($!)
wait_for "$work/apps.out" echo=
wait_for "$work/server.log" "ready"
echo_addr=$(grep -o 'echo=[0-9.:]*' "$work/apps.out" | cut -d= -f2)
"$bin" forward --identity-dir "$work/client" --listen 127.0.0.1:9000 \
    --server 127.0.0.1:15008 --server-id "$server_id" --target "$echo_addr" \
    --keepalive-interval 200ms --keepalive-timeout 500ms --log info > "$work/forward.log" 2>&1 &
pids+=($!)
wait_for "$work/forward.log" "forward ready"

exec 3<>/dev/tcp/127.0.0.1/9000
printf 'ping' >&3
read -r -n 4 -t 5 reply <&3
[ "$reply" = ping ] || { echo "no echo through the tunnel: '$reply'"; exit 1; }

# The server goes silent: its packets vanish both ways, no FIN, no RST.
iptables -A INPUT -p tcp --dport 15008 -j DROP
iptables -A INPUT -p tcp --sport 15008 -j DROP
start=$(date +%s%N)
# The entry should give up on the connection and close our socket.
if timeout 10 cat <&3 > /dev/null; then :; fi
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "detected_ms=$elapsed_ms"
# Log lines reach the file within tens of milliseconds (hbone buffers
# them); a loaded machine gets 10 s.
logged=no
if wait_for "$work/forward.log" "peer unresponsive" > /dev/null; then logged=yes; fi
echo "keepalive_logged=$logged"
