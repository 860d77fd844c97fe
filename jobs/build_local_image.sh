#!/usr/bin/env bash
# Build jobs/Dockerfile with podman where no base image can be pulled, and run the image.
#
#   sudo bash jobs/build_local_image.sh [--work DIR] [--tag NAME] [--captions N] [--rebuild-base]
#
# 1. debootstrap a minimal Debian bookworm root file system (its python3.11 is the engine's
#    Python) from the apt mirror this machine uses, and `podman import` it as the base image;
# 2. `podman build -f jobs/Dockerfile --build-arg BASE_IMAGE=<that base> --build-arg PYTHON_PPA=`
#    (no deadsnakes PPA on Debian), with the host's pip index settings (find-links, extra index
#    URLs, constraints; local folders bind-mounted read-only) and the host network, so pip
#    resolves exactly as it does here; the Dockerfile's own smoke test runs as its last step;
# 3. in the image, without network: `pipeline --help`, then `parse-captions` on the first N
#    captions of ../shared/data/captions/web_alt_text_10000.parquet (mounted read-only), and
#    the rows compared with the same run on this machine when GLIP_HOST_PYTHON (default
#    .venv/bin/python) imports the engine.
# It prints the time of each step. The image it makes has no CUDA base: for a cluster, build
# the Dockerfile as it is (see docs/cluster.md).
#
# Needs root (debootstrap, rootful podman) and `apt-get install podman debootstrap runc`.
# Sandbox settings it applies, each harmless on an ordinary machine (CONTAINERS_CONF of its
# own, nothing system-wide is changed):
# - rlimits: podman's defaults (nofile/nproc above the hard limits) need CAP_SYS_RESOURCE;
#   the containers get this shell's hard limits instead (nproc at most kernel.pid_max).
# - runtime: crun refuses hybrid cgroups (v1 controllers plus a cgroup2 mount with
#   controllers: "cgroups in hybrid mode not supported"); runc is used there.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=/tmp/glip-engine-image
TAG=localhost/glip-engine:local
BASE=localhost/glip-base:bookworm
SUITE=bookworm
CAPTIONS=200
REBUILD_BASE=0
DATA=${GLIP_SHARED_DIR:-$REPO/../shared}/data
HOST_PYTHON=${GLIP_HOST_PYTHON:-$REPO/.venv/bin/python}

die() { echo "build_local_image.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --work) WORK=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --captions) CAPTIONS=$2; shift 2 ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root: debootstrap and this rootful podman set-up need it"
for tool in podman debootstrap; do
  command -v "$tool" > /dev/null || die "$tool not found: apt-get install podman debootstrap runc"
done
[ -f "$DATA/captions/web_alt_text_10000.parquet" ] || die "$DATA/captions/web_alt_text_10000.parquet not found (set GLIP_SHARED_DIR)"
mkdir -p "$WORK"

TIMINGS=()
step() {  # step NAME COMMAND...: run it, record its wall time
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  TIMINGS+=("$(printf '%-44s %5d s' "$name" $((SECONDS - start)))")
}

# The apt mirror this machine uses (deb822 sources first, then sources.list).
MIRROR=$(sed -n 's/^URIs: *\([^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# Container settings for this sandbox (see the header).
NOFILE=$(ulimit -Hn)
NPROC=$(ulimit -Hu)
PID_MAX=$(cat /proc/sys/kernel/pid_max)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
if [ "$NPROC" = unlimited ] || [ "$NPROC" -gt "$PID_MAX" ]; then NPROC=$PID_MAX; fi
{
  echo "[containers]"
  echo "default_ulimits = [\"nofile=$NOFILE:$NOFILE\", \"nproc=$NPROC:$NPROC\"]"
  if grep -qs . /sys/fs/cgroup/unified/cgroup.controllers && [ -d /sys/fs/cgroup/memory ]; then
    command -v runc > /dev/null || die "hybrid cgroups here and crun refuses them: apt-get install runc"
    echo "[engine]"
    echo "runtime = \"runc\""
  fi
} > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf

# The host's pip index settings, for the build's `pip install` (mounted as /etc/pip.conf): a
# local index's whole folder (its simple/ pages link to ../../files/) is mounted read-only at
# its own path, and the host's CA bundle at /etc/pip-host-ca.pem (a TLS-intercepting proxy's
# CA lives there; the image's own bundle is left alone).
HOST_PIP=$(command -v python3 || true)
PIP_MOUNTS=()
{
  echo "[global]"
  if [ -n "$HOST_PIP" ]; then
    "$HOST_PIP" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.\([a-z-]*\)='\(.*\)'$/\1 \2/p"
  fi | while read -r key value; do
    case "$key" in
      index-url|extra-index-url|find-links|constraint|trusted-host|default-timeout) echo "$key = $value" ;;
      cert) [ -f "$value" ] && echo "cert = /etc/pip-host-ca.pem" && echo "#host-cert $value" ;;
    esac
  done | sort -u -t= -k1,1
} > "$WORK/pip.conf"
for path in $(sed -n 's/^[a-z-]* = //p' "$WORK/pip.conf"); do
  path=${path#file://}
  path=${path%/}
  case "$path" in
    /etc/pip-host-ca.pem) ;;
    /*/simple) [ -d "$path" ] && PIP_MOUNTS+=(--volume "${path%/simple}:${path%/simple}:ro") ;;
    /*) [ -e "$path" ] && PIP_MOUNTS+=(--volume "$path:$path:ro") ;;
  esac
done
HOST_CERT=$(sed -n 's/^#host-cert //p' "$WORK/pip.conf")
[ -n "$HOST_CERT" ] && PIP_MOUNTS+=(--volume "$HOST_CERT:/etc/pip-host-ca.pem:ro")
PIP_MOUNTS+=(--volume "$WORK/pip.conf:/etc/pip.conf:ro")

echo "repo $REPO; work $WORK; mirror $MIRROR; podman $(podman --version | awk '{print $3}');" \
  "runtime $(sed -n 's/^runtime = //p' "$WORK/containers.conf" | tr -d '"' | grep . || echo default);" \
  "ulimits nofile=$NOFILE nproc=$NPROC; pip: $(grep -c = "$WORK/pip.conf") setting(s), ${#PIP_MOUNTS[@]} mount flag(s)"

if [ "$REBUILD_BASE" = 1 ]; then
  rm -rf "$WORK/rootfs"
  podman image rm -f "$BASE" > /dev/null 2>&1 || true
fi
if ! podman image exists "$BASE"; then
  if [ ! -x "$WORK/rootfs/usr/bin/apt-get" ]; then
    rm -rf "$WORK/rootfs"
    bootstrap() { debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log"; }
    step "debootstrap $SUITE (minbase)" bootstrap
  fi
  import_base() { tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" > /dev/null; }
  step "podman import base" import_base
fi
step "podman build jobs/Dockerfile" \
  podman build --network host "${PIP_MOUNTS[@]}" \
    --build-arg BASE_IMAGE="$BASE" --build-arg PYTHON_PPA= \
    -f "$REPO/jobs/Dockerfile" -t "$TAG" "$REPO"
podman image inspect "$TAG" --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}' | cut -c1-120

# Runs in the image: no network, data read-only, outputs in $WORK/run (the image's user is uid 1000).
RUN_DIR=$WORK/run
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
chmod 0777 "$RUN_DIR"
in_image() {
  podman run --rm --network none --shm-size 1g \
    --volume "$DATA:/data:ro" --volume "$RUN_DIR:/run-out" "$TAG" "$@"
}
help_in_image() {
  in_image pipeline --help > "$RUN_DIR/help.txt"
  echo "$(grep -c . "$RUN_DIR/help.txt") lines of help; $(in_image sh -c 'python --version; id -un' | tr '\n' ' ')"
}
step "pipeline --help (in the image)" help_in_image
SLICE="import pyarrow.parquet as pq, sys; pq.write_table(pq.read_table(sys.argv[1]).slice(0, int(sys.argv[2])), sys.argv[3])"
parse_in_image() {
  in_image sh -c "python -c '$SLICE' /data/captions/web_alt_text_10000.parquet $CAPTIONS /run-out/web.parquet \
    && pipeline parse-captions /run-out/web.parquet --caption-column TEXT --workers 1 --out /run-out/phrases"
}
step "parse-captions $CAPTIONS captions (in image)" parse_in_image

SUMMARY="import json, sys, pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1] + '/web.parquet').to_pylist()
stats = json.load(open(sys.argv[1] + '/_stats.json'))
print('rows', len(rows), '| with phrases', sum(bool(r['phrases']) for r in rows), '| phrases', sum(len(r['phrases']) for r in rows),
      '| errors', sum(r['error'] is not None for r in rows))
for r in rows[:3]:
    print(' ', repr(r['caption'][:70]), '->', [p['text'] for p in r['phrases']][:6])"
in_image python -c "$SUMMARY" /run-out/phrases

if [ -x "$HOST_PYTHON" ] && PYTHONPATH=$REPO "$HOST_PYTHON" -c "import pipeline" 2> /dev/null; then
  parse_on_host() {
    RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=$REPO "$HOST_PYTHON" -m pipeline parse-captions \
      "$RUN_DIR/web.parquet" --caption-column TEXT --workers 1 --out "$WORK/host-phrases" --overwrite > "$WORK/host-parse.log" 2>&1
  }
  step "the same parse on this machine" parse_on_host
  COMPARE="import sys, pyarrow.parquet as pq
cols = ['key', 'caption', 'phrases', 'error']
a, b = (pq.read_table(p + '/web.parquet', columns=cols).to_pylist() for p in sys.argv[1:])
ma, mb = (pq.read_metadata(p + '/web.parquet').metadata for p in sys.argv[1:])
meta = sorted(k.decode() for k in set(ma) | set(mb) if ma.get(k) != mb.get(k) and k != b'ARROW:schema')
print(f'image and host: {len(a)} rows', 'identical' if a == b else 'DIFFER', '| file metadata differing:', meta or 'none')
sys.exit(a != b)"
  PYTHONPATH=$REPO "$HOST_PYTHON" -c "$COMPARE" "$RUN_DIR/phrases" "$WORK/host-phrases"
else
  echo "(no host interpreter with the engine at $HOST_PYTHON: set GLIP_HOST_PYTHON to compare rows)"
fi

echo "== timings (run the image yourself with CONTAINERS_CONF=$CONTAINERS_CONF podman run --rm $TAG ...)"
printf '%s\n' "${TIMINGS[@]}"
