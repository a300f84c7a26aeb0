#!/usr/bin/env bash
# Start the services template builds and their tests use, if they are not running yet (as
# root): virtlogd and libvirtd (virt-install's domains) and, where it is installed (setup.sh
# --test), Redis (the Celery broker).
# There is no systemd on CI machines, so each daemon is started directly.
set -euo pipefail

start() {  # start NAME COMMAND...: unless a process called NAME runs already
    local name=$1; shift
    pgrep -x "$name" >/dev/null || "$@"
}

# Without udev (containers, CI machines) /dev/kvm stays root-only. libvirt probes QEMU as
# root but runs it as libvirt-qemu, sees the two disagree, and re-probes QEMU's capabilities
# on every call: minutes per domain start. Debian's udev rule would make it root:kvm 0660.
if [[ -c /dev/kvm ]]; then
    if getent group kvm >/dev/null; then
        chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    else
        chmod 0666 /dev/kvm  # no kvm group to give it to (libvirt-qemu is in kvm normally)
    fi
fi

start virtlogd virtlogd -d
start libvirtd libvirtd -d
redis=false
if command -v redis-server >/dev/null; then
    redis=true
    start redis-server redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' \
        --appendonly no
fi

# Wait until they answer: the tests must not race the daemons' start-up.
for _ in $(seq 100); do
    if virsh -c qemu:///system version >/dev/null 2>&1 &&
       { ! $redis || redis-cli -p 6379 ping >/dev/null 2>&1; }; then
        exit 0
    fi
    sleep 0.1
done
echo "libvirtd$($redis && echo " or redis-server") did not come up" >&2
exit 1
