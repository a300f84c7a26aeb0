#!/bin/bash
# The worker image's entrypoint: give libvirt's session mode, virt-install and libguestfs
# writable homes and a runtime directory, then run the Celery worker:
#   diskflow-worker-entrypoint [OPTION...]    diskflow worker OPTION... (no arguments: defaults)
#   diskflow-worker-entrypoint COMMAND [ARG...]  COMMAND in the same environment (a one-off
#                                             `diskflow build`, `virsh list`, a debug shell)
#
# The root filesystem may be read-only: homes live under $DISKFLOW_STATE_DIR (default
# /var/lib/diskflow; in a pod, a PVC or an emptyDir), the runtime directory under /tmp (an
# emptyDir). Session-mode libvirtd and virtlogd put their config in $XDG_CONFIG_HOME/libvirt
# and the domains' logs in $XDG_CACHE_HOME/libvirt; virt-install its kernel copies and log in
# $XDG_CACHE_HOME/virt-manager (diskflow looks for them in ~/.cache, hence XDG_CACHE_HOME is
# $HOME/.cache); libguestfs its appliance in $LIBGUESTFS_CACHEDIR. Sockets, pid files and
# running domains' state go in $XDG_RUNTIME_DIR: that is on /tmp, not on the state volume, so
# a restarted pod (same PVC) never finds a previous pod's stale daemons and domains there.
set -euo pipefail

state=${DISKFLOW_STATE_DIR:-/var/lib/diskflow}
if ! mkdir -p "$state" 2>/dev/null || [[ ! -w "$state" ]]; then
    echo "diskflow-worker: $state (DISKFLOW_STATE_DIR) is not writable by uid $(id -u):" \
        "mount a volume there (an emptyDir will do)" >&2
    exit 1
fi

export HOME=$state/home
export XDG_CONFIG_HOME=$HOME/.config
export XDG_CACHE_HOME=$HOME/.cache
export XDG_DATA_HOME=$HOME/.local/share
export XDG_RUNTIME_DIR=/tmp/diskflow-runtime-$(id -u)
export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
export LIBGUESTFS_CACHEDIR=${LIBGUESTFS_CACHEDIR:-$XDG_CACHE_HOME/libguestfs}
export LIBVIRT_DEFAULT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///session}
mkdir -p "$XDG_CONFIG_HOME" "$XDG_CACHE_HOME" "$XDG_DATA_HOME" "$LIBGUESTFS_CACHEDIR"
# The runtime dir holds the daemons' sockets: only this user may enter it.
mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
if [[ ! -O "$XDG_RUNTIME_DIR" ]]; then
    echo "diskflow-worker: $XDG_RUNTIME_DIR belongs to another user" >&2
    exit 1
fi
chmod 0700 "$XDG_RUNTIME_DIR"

# Relative build outputs (`diskflow build --output build`, the default) land in the state dir.
cd "$state"
if [[ $# -eq 0 || "$1" == -* ]]; then
    set -- diskflow worker "$@"
fi
exec "$@"
