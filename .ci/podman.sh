#!/usr/bin/env bash
# Start (or stop) a private Podman API service (Docker-compatible) for the tests: its own
# storage and socket, runc (crun refuses this kind of host's hybrid cgroups), cgroupfs, and
# rlimits within the hard limits (CAP_SYS_RESOURCE may be missing from root's bounding set).
# Usage: .ci/podman.sh start|stop DIR; `start` prints the CONTAINER_HOST to export.
set -euo pipefail
cmd=$1; dir=$2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)  # absolute: the daemon is started from /
if [ "$cmd" = stop ]; then
    if [ -f "$dir/podman.pid" ]; then
        pid=$(cat "$dir/podman.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    # Podman's overlay storage keeps a private bind mount of its own directory.
    umount "$dir/storage/overlay" 2>/dev/null || true
    exit 0
fi
command -v podman >/dev/null || { echo "podman not installed" >&2; exit 1; }
cat > "$dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
sock="$dir/podman.sock"
if [ -S "$sock" ] && curl -fsS --unix-socket "$sock" http://d/_ping >/dev/null 2>&1; then
    echo "unix://$sock"; exit 0
fi
cd /  # never the checkout: the service and its children write into their working directory
CONTAINERS_CONF="$dir/containers.conf" setsid podman --root "$dir/storage" \
    --runroot "$dir/run" --storage-driver overlay system service --time=0 "unix://$sock" \
    >"$dir/podman.log" 2>&1 < /dev/null &
echo $! > "$dir/podman.pid"
for _ in $(seq 100); do
    if curl -fsS --unix-socket "$sock" http://d/_ping >/dev/null 2>&1; then
        echo "unix://$sock"; exit 0
    fi
    sleep 0.2
done
echo "the podman service did not start; log:" >&2; tail -30 "$dir/podman.log" >&2; exit 1
