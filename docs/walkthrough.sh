#!/usr/bin/env bash
# The README's two-node walkthrough as a script: two network namespaces on one machine stand in
# for two hosts (node A 10.77.0.1, node B 10.77.0.2, joined by a veth pair).
#
#   docs/walkthrough.sh up       create the namespaces and the link (idempotent)
#   docs/walkthrough.sh run      up, then every step of the walkthrough, then down (KEEP=1 keeps it)
#   docs/walkthrough.sh split-brain  up, a split brain made on purpose and resolved, then down
#   docs/walkthrough.sh down     stop what this script started, remove the namespaces and files
#                                (idempotent)
#
# Root, iproute2, qemu-io and nbdinfo (Debian: qemu-utils, libnbd-bin). The binary comes from
# `cargo build --release -p mirror-user` (MIRROR overrides the path). With EBPF=1 (a binary from
# `cargo xtask build --release`), `run` also starts the node daemon on a bpffs mounted at $W/bpf
# (`ip netns exec` mounts a fresh /sys, so pins under /sys/fs/bpf are not seen inside) and points
# the replica and the router at it. Every process it starts is recorded in $W/*.pid and stopped by
# that pid.
set -euo pipefail
unset RUST_BACKTRACE

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MIRROR="${MIRROR:-$ROOT/target/release/mirror}"
W="${W:-/var/tmp/mirror-walkthrough}"
CTL="${CTL:-/run/mirror/ctl.sock}"
A=mirror-a
B=mirror-b

say() { printf '\n$ %s\n' "$*"; }
run() { say "$@"; "$@"; }

up() {
    for ns in "$A" "$B"; do
        ip netns list | grep -qw "^$ns" || ip netns add "$ns"
    done
    if ! ip -n "$A" link show veth-a >/dev/null 2>&1; then
        ip link add veth-a netns "$A" type veth peer name veth-b netns "$B"
    fi
    ip -n "$A" addr replace 10.77.0.1/24 dev veth-a
    ip -n "$B" addr replace 10.77.0.2/24 dev veth-b
    for ns in "$A" "$B"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$A" link set veth-a up
    ip -n "$B" link set veth-b up
}

stop_serve() { # the router stops (SIGTERM: it drains, flushes and drops its write intent)
    say "kill \$(cat $W/serve-a.pid)"
    stop serve-a
}

stop() { # stop NAME: SIGTERM the process recorded in $W/NAME.pid, wait for it
    local f="$W/$1.pid" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        wait "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

down() {
    stop serve-a
    stop replica-a
    stop replica-b
    stop daemon
    if mountpoint -q "$W/bpf" 2>/dev/null; then umount "$W/bpf"; fi
    for ns in "$A" "$B"; do
        ip netns list | grep -qw "^$ns" && ip netns del "$ns"
    done
    rm -rf "$W"
}

start() { # start NAME NS CMD...: run CMD in namespace NS in the background, log in $W/NAME.log
    local name="$1" ns="$2"
    shift 2
    say "ip netns exec $ns $* > $W/$name.log 2>&1 &"
    ip netns exec "$ns" "$@" >"$W/$name.log" 2>&1 &
    echo $! >"$W/$name.pid"
}

wait_for() { # wait_for NAME TEXT: until TEXT shows in $W/NAME.log (30 s)
    for _ in $(seq 300); do
        if grep -q "$2" "$W/$1.log" 2>/dev/null; then
            grep "$2" "$W/$1.log"
            return 0
        fi
        if ! kill -0 "$(cat "$W/$1.pid")" 2>/dev/null; then
            local rc=0
            wait "$(cat "$W/$1.pid")" || rc=$?
            echo "$1 exited with status $rc" >&2
            cat "$W/$1.log"
            return 1
        fi
        sleep 0.1
    done
    cat "$W/$1.log"
    return 1
}

replica() { # replica NAME NS ADDR FILE [FLAGS...]: a replica server of vol0 in FILE, in namespace NS,
    # with the credentials in $W/tls/NAME
    local name="$1" ns="$2" addr="$3" file="$4"
    shift 4
    start "$name" "$ns" mirror replica --listen "$addr" --volume "vol0=$file" --secret-file "$W/secret" \
        --tls "$W/tls/$name" "$@"
    wait_for "$name" "listening on"
}

crash() { # crash NAME WHAT: SIGKILL the process recorded in $W/NAME.pid
    say "kill -KILL \$(cat $W/$1.pid)   # $2"
    kill -KILL "$(cat "$W/$1.pid")"
    wait "$(cat "$W/$1.pid")" 2>/dev/null || true
    rm -f "$W/$1.pid"
}

until_status() { # until_status TEXT: poll `mirror ctl status` until it shows TEXT (120 s)
    for _ in $(seq 240); do
        "$MIRROR" ctl --socket "$CTL" status | grep -q "$1" && return 0
        sleep 0.5
    done
    echo "status never showed: $1" >&2
    return 1
}

credentials() { # a CA, and the credentials of node A (10.77.0.1) and node B (10.77.0.2)
    run mirror certs ca --dir "$W/tls/ca"
    run mirror certs node --ca "$W/tls/ca" --name node-a --ip 10.77.0.1 --dir "$W/tls/node-a"
    run mirror certs node --ca "$W/tls/ca" --name node-b --ip 10.77.0.2 --dir "$W/tls/node-b"
    # The replica server names of split_brain: the same nodes.
    ln -sfn node-a "$W/tls/replica-a"
    ln -sfn node-b "$W/tls/replica-b"
}

walkthrough() {
    export PATH="$(dirname "$MIRROR"):$PATH"
    if [ -S "$CTL" ] && "$MIRROR" ctl --socket "$CTL" status >/dev/null 2>&1; then
        echo "a mirror serve already answers on $CTL: stop it or set CTL" >&2
        exit 1
    fi
    up
    run ip -n "$A" -br addr show veth-a
    run ip -n "$B" -br addr show veth-b

    # Both nodes share a secret; each keeps its replica in a file of its own.
    run mkdir -p "$W/a" "$W/b"
    say "head -c 32 /dev/urandom | base64 > $W/secret"
    head -c 32 /dev/urandom | base64 >"$W/secret"
    # Each node's certificate, signed by the volume's CA: the replication link is TLS 1.3.
    credentials

    # With EBPF=1: the node daemon's eBPF telemetry, pinned where the namespaces see it.
    PIN=()
    if [ "${EBPF:-0}" = 1 ]; then
        run mkdir -p "$W/bpf"
        run mount -t bpf bpf "$W/bpf"
        say "mirror daemon --pin-dir $W/bpf/mirror --quiet > $W/daemon.log 2>&1 &"
        "$MIRROR" daemon --pin-dir "$W/bpf/mirror" --quiet >"$W/daemon.log" 2>&1 &
        echo $! >"$W/daemon.pid"
        wait_for daemon "ready: block statistics from ebpf"
        PIN=(--pin-dir "$W/bpf/mirror")
    fi

    # Node B: a replica server.
    replica replica-b "$B" 10.77.0.2:7700 "$W/b/vol0.img:1G" "${PIN[@]}"

    # Node A: the mirrored volume, a local source and node B's replica as the target.
    start serve-a "$A" mirror serve --volume vol0 --source "local:$W/a/vol0.img:1G" \
        --target remote:10.77.0.2:7700 --source-listen 10.77.0.1:7700 --tls "$W/tls/node-a" \
        --nbd 127.0.0.1:10809 --nbd-unix "$W/a/vol0.sock" --secret-file "$W/secret" "${PIN[@]}"
    wait_for serve-a "nbd listening on"
    until_status "target .* in-sync"
    run mirror ctl status

    # A client on node A writes and reads (the default export is the volume).
    run ip netns exec "$A" qemu-io -f raw nbd://127.0.0.1:10809 \
        -c "write -P 0xab 0 4M" -c "read -P 0xab 0 4M"
    run nbdinfo "nbd+unix:///?socket=$W/a/vol0.sock"
    run mirror ctl status
    if [ "${EBPF:-0}" = 1 ]; then
        run bpftool map dump pinned "$W/bpf/mirror/weights-vol0"
    fi

    # Failover: every read to node B.
    run mirror ctl failover
    run ip netns exec "$A" qemu-io -f raw nbd://127.0.0.1:10809 -c "read -P 0xab 0 4M"
    run mirror ctl status

    # Failback: reads ramp back to node A.
    run mirror ctl failback
    run mirror ctl status
    until_status "mode Normal"
    run mirror ctl status

    # Both replicas hold the same data.
    run ip netns exec "$A" mirror sync --verify --node 10.77.0.1:7700 --peer 10.77.0.2:7700 \
        --volume vol0 --secret-file "$W/secret" --tls "$W/tls/node-a"

    # Node B goes away: writes go on, recorded on node A; B comes back and is resynced.
    crash replica-b "node B dies"
    run ip netns exec "$A" qemu-io -f raw nbd://127.0.0.1:10809 -c "write -P 0xcd 4M 4M"
    until_status "target .*down"
    run mirror ctl status
    replica replica-b "$B" 10.77.0.2:7700 "$W/b/vol0.img:1G" "${PIN[@]}"
    until_status "target .* in-sync"
    run mirror ctl status
    until_status "mode Normal"
    run mirror ctl status
    run ip netns exec "$B" mirror status --node 10.77.0.2:7700 --volume vol0 --secret-file "$W/secret" \
        --tls "$W/tls/node-b"
    run ip netns exec "$A" mirror sync --verify --node 10.77.0.1:7700 --peer 10.77.0.2:7700 \
        --volume vol0 --secret-file "$W/secret" --tls "$W/tls/node-a"
}

refused() { # refused CMD...: CMD must fail; shows its error (from the line starting "Error")
    say "$@"
    local out
    if out="$("$@" 2>&1)"; then
        echo "expected a refusal, got success" >&2
        return 1
    fi
    printf '%s\n' "$out" | sed -n '/^Error/,$p'
}

serve_ab() { # serve_ab SOURCE TARGET [FLAGS...]: a router on node A over two remote replicas
    local src="$1" tgt="$2"
    shift 2
    start serve-a "$A" mirror serve --volume vol0 --source "remote:$src" --target "remote:$tgt" \
        --nbd 127.0.0.1:10809 --secret-file "$W/secret" --tls "$W/tls/node-a" "$@"
    wait_for serve-a "nbd listening on"
}

split_brain() {
    export PATH="$(dirname "$MIRROR"):$PATH"
    up
    mkdir -p "$W/a" "$W/b"
    head -c 32 /dev/urandom | base64 >"$W/secret"
    credentials
    # Two replica servers, one per node, and a router over both (it syncs them first).
    replica replica-a "$A" 10.77.0.1:7700 "$W/a/vol0.img:256M"
    replica replica-b "$B" 10.77.0.2:7700 "$W/b/vol0.img:256M"
    serve_ab 10.77.0.1:7700 10.77.0.2:7700
    until_status "target .* in-sync"
    run ip netns exec "$A" qemu-io -f raw nbd://127.0.0.1:10809 -c "write -P 0xab 0 4M"
    stop_serve

    # Node B is away; a router serves from A alone (the operator vouches for it: --degraded).
    crash replica-b "node B dies"
    refused ip netns exec "$A" mirror serve --volume vol0 --source remote:10.77.0.1:7700 \
        --target remote:10.77.0.2:7700 --nbd 127.0.0.1:10809 --secret-file "$W/secret" --tls "$W/tls/node-a"
    serve_ab 10.77.0.1:7700 10.77.0.2:7700 --degraded
    run ip netns exec "$A" qemu-io -f raw nbd://127.0.0.1:10809 -c "write -P 0x11 0 4M"
    stop_serve

    # Then node A is away and B comes back; another router serves from B alone, also --degraded.
    crash replica-a "node A dies"
    replica replica-b "$B" 10.77.0.2:7700 "$W/b/vol0.img:256M"
    serve_ab 10.77.0.2:7700 10.77.0.1:7700 --degraded
    run ip netns exec "$A" qemu-io -f raw nbd://127.0.0.1:10809 -c "write -P 0x22 0 4M"
    stop_serve

    # Both back: each holds writes the other lacks. Nothing syncs either way until the operator
    # chooses; here node B's writes are discarded.
    replica replica-a "$A" 10.77.0.1:7700 "$W/a/vol0.img:256M"
    refused ip netns exec "$A" mirror serve --volume vol0 --source remote:10.77.0.1:7700 \
        --target remote:10.77.0.2:7700 --nbd 127.0.0.1:10809 --secret-file "$W/secret" --tls "$W/tls/node-a"
    refused ip netns exec "$A" mirror sync --node 10.77.0.1:7700 --peer 10.77.0.2:7700 \
        --volume vol0 --secret-file "$W/secret" --tls "$W/tls/node-a"
    run ip netns exec "$A" mirror resolve --node 10.77.0.2:7700 --volume vol0 \
        --secret-file "$W/secret" --tls "$W/tls/node-a" --discard
    run ip netns exec "$A" mirror sync --node 10.77.0.1:7700 --peer 10.77.0.2:7700 \
        --volume vol0 --secret-file "$W/secret" --tls "$W/tls/node-a"
    run ip netns exec "$A" mirror sync --verify --node 10.77.0.1:7700 --peer 10.77.0.2:7700 \
        --volume vol0 --secret-file "$W/secret" --tls "$W/tls/node-a"

    # Node B now holds node A's data: read it there.
    serve_ab 10.77.0.1:7700 10.77.0.2:7700
    until_status "target .* in-sync"
    run mirror ctl weights set --target 100
    run ip netns exec "$A" qemu-io -f raw nbd://127.0.0.1:10809 -c "read -P 0x11 0 4M"
    run mirror ctl status
    run mirror ctl weights auto
}

case "${1:-}" in
up) up ;;
down) down ;;
split-brain)
    trap 'rc=$?; [ $rc = 0 ] || tail -n 20 "$W"/*.log; [ "${KEEP:-0}" = 1 ] || down' EXIT
    split_brain
    ;;
run)
    # On failure, the logs' last lines before they go.
    trap 'rc=$?; [ $rc = 0 ] || tail -n 20 "$W"/*.log; [ "${KEEP:-0}" = 1 ] || down' EXIT
    walkthrough
    ;;
*)
    echo "usage: $0 up|run|split-brain|down" >&2
    exit 2
    ;;
esac
