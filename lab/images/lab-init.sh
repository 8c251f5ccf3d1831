# The lab VM's init, after the prelude (busybox, /proc, /sys, /dev, cmdline_arg) and the module loads that
# build.py puts in front of it. lab/labvm boots it; see lab/README.md.
#
# The host's root arrives over virtio-fs (tag hostroot). It becomes the lower layer of an overlay whose upper
# layer is tmpfs, so every path is writable inside and nothing reaches the host's files, except the
# repository's build/ directory (lab.build=PATH), bound straight to the share. Then this script chroots into
# it: every tool installed on the host and the checkout are at the same paths inside.
fail() {
    echo "lab-init: $*"
    poweroff -f
}
port() {  # /dev node of the virtio-serial port named $1
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    return 1
}

build=$(cmdline_arg lab.build) || fail "no lab.build= on the kernel command line"
mode=$(cmdline_arg lab.mode || echo exec)
mkdir -p /run/host /run/rw
mount -t virtiofs hostroot /run/host || fail "cannot mount the host root (virtio-fs tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /run/rw
mkdir -p /run/rw/upper /run/rw/work
mount -t overlay -o lowerdir=/run/host,upperdir=/run/rw/upper,workdir=/run/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"
R=/newroot
# The repository (build/'s parent) may live under a path that gets a tmpfs below (a clone in /tmp, as CI
# makes): keep the overlay's view of it aside and put it back, then bind build/ over it.
repo=${build%/build}
mkdir -p /run/rw/repo
mount --bind "$R$repo" /run/rw/repo || fail "cannot bind the repository $repo"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || echo "lab-init: no cgroup2"
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts $R/dev/pts
ln -sf pts/ptmx $R/dev/ptmx 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
for d in /tmp /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs "$R$d"; done
mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p $R/run/netns $R/run/lock $R/lib/modules "$R$repo"
mount --bind /run/rw/repo "$R$repo" || fail "cannot restore the repository $repo"
mount --bind "/run/host$build" "$R$build" || fail "cannot bind $build"
# the guest kernel's modules, where the host's kmod finds them
mount --bind "/run/host$build/lab/guest/modules/lib/modules" $R/lib/modules
chroot $R /sbin/modprobe -a kvm kvm_amd irqbypass tun veth sch_ingress cls_u32 act_mirred vhost vhost_iotlb \
    vhost_net vsock vmw_vsock_virtio_transport_common vhost_vsock br_netfilter loop erofs 2>&1 | sed 's/^/lab-init: /'
# One KVM VM with one vCPU that lives as long as the lab VM: the lab kernel flips static keys (the scheduler's
# preempt notifiers, KVM's lapic keys) when the count of VMs or vCPUs leaves or returns to zero, by patching
# hot code with int3 while the other vCPU runs it, and QEMU's TCG loses such a patch at random: a lab vCPU
# then loops on a stale int3 in __schedule with interrupts off and the lab VM freezes (lab/README.md, "The
# lab VM's own failures"). With a VM always there, creating and destroying the tests' VMs patches nothing.
chroot $R /usr/bin/python3 -c '
import fcntl, os, signal
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
fcntl.ioctl(vm, 0xAE60, 0)  # KVM_CREATE_IRQCHIP: the vCPU gets an in-kernel local APIC
fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU 0, never run
signal.pause()
' 2>&1 | sed 's/^/lab-init: kvm anchor: /' &
echo kata-lab > /proc/sys/kernel/hostname
chroot $R /sbin/ip link set lo up 2>/dev/null

ctl=$(port lab.ctl) || fail "no lab.ctl port"
read -r request < "$ctl"
echo "$request" | base64 -d > $R/run/lab-request.sh || fail "bad request"
echo started > "$ctl"
# the heartbeat labvm watches: a lab VM whose own kernel stopped sends none (lab/labvm HEARTBEAT_TIMEOUT)
(while sleep 10; do echo alive > "$ctl"; done) &
heartbeat=$!
if [ "$mode" = shell ]; then
    setsid cttyhack chroot $R /bin/sh /run/lab-request.sh
    rc=$?
else
    out=$(port lab.stdout) && err=$(port lab.stderr) || fail "no lab.stdout/lab.stderr port"
    chroot $R /bin/sh /run/lab-request.sh < /dev/null > "$out" 2> "$err"
    rc=$?
fi
kill $heartbeat
wait $heartbeat 2>/dev/null
sync
echo "exit $rc" > "$ctl"
poweroff -f
