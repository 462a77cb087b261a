#!/usr/bin/env bash
# Start (or stop) a private dockerd for the tests: its own data root, socket and containerd
# namespace, no iptables, no bridge (containers run with --network none anyway), runsc
# registered as a runtime with --network=none. Usage: .ci/dockerd.sh start|stop DIR
# `start` prints the DOCKER_HOST to export.
set -euo pipefail
cmd=$1; dir=$2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)  # absolute: the daemon is started from /
if [ "$cmd" = stop ]; then
    if [ -f "$dir/dockerd.pid" ]; then
        pid=$(cat "$dir/dockerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    exit 0
fi
runtimes=""
if command -v runsc >/dev/null; then
    runtimes="\"runtimes\": {\"runsc\": {\"path\": \"$(command -v runsc)\", \"runtimeArgs\": [\"--network=none\", \"--platform=systrap\"]}},"
fi
cat > "$dir/daemon.json" <<JSON
{ $runtimes "storage-driver": "overlay2" }
JSON
if [ -S "$dir/docker.sock" ] && DOCKER_HOST="unix://$dir/docker.sock" docker version >/dev/null 2>&1; then
    echo "unix://$dir/docker.sock"; exit 0
fi
cd /  # the daemon and its shims write files (an `oom` marker) into their working directory
setsid dockerd --data-root "$dir/data" --exec-root "$dir/exec" -H "unix://$dir/docker.sock" \
    --pidfile "$dir/dockerd.pid" --containerd-namespace stockade-ci \
    --containerd-plugins-namespace stockade-ci-plugins --iptables=false --ip6tables=false \
    --bridge=none --config-file "$dir/daemon.json" >"$dir/dockerd.log" 2>&1 < /dev/null &
for _ in $(seq 150); do
    if DOCKER_HOST="unix://$dir/docker.sock" docker version >/dev/null 2>&1; then
        echo "unix://$dir/docker.sock"; exit 0
    fi
    sleep 0.2
done
echo "dockerd did not start; log:" >&2; tail -30 "$dir/dockerd.log" >&2; exit 1
