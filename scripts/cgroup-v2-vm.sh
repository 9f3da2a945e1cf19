#!/usr/bin/env bash
# Runs mqvisor's control-group code on a host with a pure cgroup v2
# hierarchy: boots a Debian kernel under QEMU (software emulation, no KVM
# needed) with an initramfs holding busybox and the given mqvisor binary,
# and prints what each scenario did. `tests/limits.rs` checks the output.
#
# The scenarios (no VM is booted inside: `--kvm-device /nonexistent` makes
# mqvisor stop right after it has joined its group, which stays to be read):
#   1. started in the root group: its group and limits;
#   2. a second start removes the first's empty group;
#   3. alone in a delegated group: it steps into a leaf, then shares out;
#   4. in a group with another process: refused with one line;
#   5. `mqvisor serve` alone in a delegated group, with two limited tenants:
#      it steps into its own leaf once, makes both groups beside it, and
#      removes them at exit.
#
# Usage: scripts/cgroup-v2-vm.sh MQVISOR [KERNEL]
#        scripts/cgroup-v2-vm.sh --fetch       (only fetch the kernel)
# Without KERNEL, Debian's cloud kernel is fetched with `apt-get download`
# into target/cgroup-v2-kernel/. Needs qemu-system-x86, busybox-static, cpio.
set -euo pipefail

mqvisor=${1:?usage: $0 MQVISOR [KERNEL] | --fetch}
kernel=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=$root/target/cgroup-v2-kernel

fetch_kernel() {
    ls "$cache"/boot/vmlinuz-* >/dev/null 2>&1 && return
    package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image/ {print $2; exit}')
    [[ -n $package ]] || { echo "cgroup-v2-vm: apt knows no Debian cloud kernel (apt-get update?)" >&2; exit 1; }
    mkdir -p "$cache"
    (cd "$cache" && apt-get download -qq "$package" 2>/dev/null && dpkg-deb -x "$package"_*.deb . && rm -f ./*.deb)
}

if [[ $mqvisor == --fetch ]]; then
    fetch_kernel
    exit
fi
if [[ -z $kernel ]]; then
    fetch_kernel
    kernel=$(ls "$cache"/boot/vmlinuz-* | head -1)
fi

busybox=$(command -v busybox)
! ldd "$busybox" >/dev/null 2>&1 ||
    { echo "cgroup-v2-vm: $busybox is not static (install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree=$work/tree
mkdir -p "$tree"/{bin,proc,sys,dev,tmp}
cp "$busybox" "$tree/bin/busybox"
cp "$mqvisor" "$tree/mqvisor"
# The binary's shared libraries, at the paths its loader looks for them.
for lib in $(ldd "$mqvisor" | grep -o '/[^ ]*'); do
    mkdir -p "$tree$(dirname "$lib")"
    cp -L "$lib" "$tree$lib"
done
cat >"$tree/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
cg=/sys/fs/cgroup
try() { /mqvisor run --service demo --kvm-device /nonexistent "$@" 2>&1 | grep -v "does not expose KVM"; }
echo "controllers: $(cat $cg/cgroup.controllers)"
echo "== 1 root"
try --cpus 0.5 --memory-limit 64 --pids-limit 8 | grep -v "note:"
for g in $cg/mqvisor/run-*; do
    echo "group ${g#$cg/}: cpu.max=$(cat $g/cpu.max) memory.max=$(cat $g/memory.max) memory.swap.max=$(cat $g/memory.swap.max) pids.max=$(cat $g/pids.max)"
done
echo "== 2 sweep"
try --pids-limit 8
echo "groups: $(ls -d $cg/mqvisor/run-* | wc -l)"
echo "== 3 delegated"
mkdir $cg/svc
sh -c "echo \$\$ > $cg/svc/cgroup.procs; exec /mqvisor run --service demo --cpus 0.25 --kvm-device /nonexistent 2>&1" | grep -v "does not expose KVM"
for g in $cg/svc/mqvisor/run-*; do echo "group ${g#$cg/}: cpu.max=$(cat $g/cpu.max)"; done
echo "svc: processes $(wc -l < $cg/svc/cgroup.procs), shares $(cat $cg/svc/cgroup.subtree_control)"
echo "== 4 busy"
mkdir $cg/busy
sh -c "echo \$\$ > $cg/busy/cgroup.procs; sleep 30 & /mqvisor run --service demo --cpus 0.25 --kvm-device /nonexistent 2>&1; echo exit \$?; kill \$!"
echo "== 5 serve"
ip link set lo up
mkdir $cg/svc2 /tmp/serve
printf 'listen = "127.0.0.1:0"\nstate_dir = "/tmp/serve/state"\n[defaults]\ncpus = 0.5\n[tenants.a]\n[tenants.b]\npids_limit = 8\n' >/tmp/serve/serve.toml
sh -c "echo \$\$ > $cg/svc2/cgroup.procs; exec /mqvisor serve --config /tmp/serve/serve.toml" >/tmp/serve/log 2>&1 &
daemon=$!
for _ in $(seq 50); do grep -q "serve listening" /tmp/serve/log && break; sleep 0.1; done
grep "serve:" /tmp/serve/log
for g in $cg/svc2/mqvisor/serve-*-*; do echo "group ${g#$cg/}: cpu.max=$(cat $g/cpu.max) pids.max=$(cat $g/pids.max)"; done
echo "daemon in $(cut -d: -f3 /proc/$daemon/cgroup)"
kill $daemon
wait $daemon
echo "tenant groups after exit: $(ls -d $cg/svc2/mqvisor/serve-*-* 2>/dev/null | wc -l)"
echo "== end"
poweroff -f
EOF
chmod +x "$tree/init"
(cd "$tree" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.gz"

timeout 300 qemu-system-x86_64 -machine q35 -accel tcg -m 512 -nographic -no-reboot \
    -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" </dev/null |
    tr -d '\r' | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g' | sed -n '/controllers:/,/^== end/p'
