# What the scripts that build hosts out of network namespaces share;
# sourced, after `set -euo pipefail`.

# The processes and namespaces a script made, removed on exit.
pids=()
namespaces=()
cleanup() {
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT
# The test's backstop (timeout) sends TERM: clean up then too.
trap 'exit 1' TERM INT

# Creates namespace NAME (lo up), to be deleted on exit.
add_ns() {
    ip netns add "$1"
    namespaces+=("$1")
    ip -n "$1" link set lo up
}

# Waits up to 10 s for PATTERN in FILE.
wait_for() {
    for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for '$2' in $1"; return 1
}

# Starts a plain TCP echo app in namespace NS on port 8080 of each ADDR,
# writing each peer's address to LOG as `peer=ADDR`, and `listening`
# once bound. Usage: echo_app NS LOG ADDR...
echo_app() {
    local ns=$1 log=$2
    shift 2
    ip netns exec "$ns" python3 -c '
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def echo(c, peer):
    print("peer=%s" % peer[0], file=log)
    while True:
        data = c.recv(65536)
        if not data: break
        c.sendall(data)
    c.shutdown(socket.SHUT_WR); c.close()
def serve(s):
    while True:
        c, peer = s.accept()
        threading.Thread(target=echo, args=(c, peer), daemon=True).start()
for addr in sys.argv[2:]:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 8080)); s.listen(16)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("listening", file=log)
threading.Event().wait()
' "$log" "$@" &
    pids+=($!)
}

# The unmodified client: 256 KiB of random bytes, then half-close, then
# everything the app echoes until it closes. Args: address, key prefix.
# Prints KEYclient_local, KEYsent_sha, KEYechoed_sha and KEYechoed_len.
client='
import hashlib, os, socket, sys
addr, key = sys.argv[1], sys.argv[2]
data = os.urandom(256 * 1024)
c = socket.create_connection((addr, 8080), timeout=10)
print("%sclient_local=%s" % (key, c.getsockname()[0]))
c.sendall(data)
c.shutdown(socket.SHUT_WR)
got = bytearray()
while True:
    chunk = c.recv(65536)
    if not chunk: break
    got += chunk
print("%ssent_sha=%s" % (key, hashlib.sha256(data).hexdigest()))
print("%sechoed_sha=%s" % (key, hashlib.sha256(bytes(got)).hexdigest()))
print("%sechoed_len=%d" % (key, len(got)))
'
