#!/bin/sh
# lab.run script of lab/bench/hotplug_bench.py, the same on kata-vmm and on QEMU: wait for each hot-plugged
# disk and vCPU and print a marker with its sequence number as soon as it is usable, and another once it is
# gone. hpb.runs=N on the kernel command line: N disk cycles, then N vCPU cycles. hpb.poll=S: seconds
# between two looks (a read timeout on a fifo: no fork, and the guest's one vCPU is free for the hot-plug
# work in between). The markers, which hotplug_bench.py parses:
#   HPB disk+ SEQ       /dev/vda's first sector was read
#   HPB disk- SEQ       /sys/block/vda is gone
#   HPB cpu+ SEQ MASK   cpu1 is online (MASK: /sys/devices/system/cpu/online, "0-1")
#   HPB cpu- SEQ MASK   cpu1 is gone from sysfs (offline and unregistered)
# HPB_SYS, HPB_DEV, HPB_CMDLINE and TMPDIR point it at a fake tree (lab/tests/test_hotplug_bench.py).
SYS=${HPB_SYS:-/sys}
DEV=${HPB_DEV:-/dev}
CPU=$SYS/devices/system/cpu
OOPS='BUG:|Oops|WARNING:|general protection|Call Trace'

arg() {  # arg NAME DEFAULT: the value of NAME=... on the kernel command line
    for word in $(cat "${HPB_CMDLINE:-/proc/cmdline}"); do
        case "$word" in "$1="*) echo "${word#*=}"; return;; esac
    done
    echo "$2"
}
RUNS=$(arg hpb.runs 10)
POLL=$(arg hpb.poll 0.005)
TICK=${TMPDIR:-/tmp}/hpb.tick.$$
mkfifo "$TICK" || exit 1
tick() { read -t "$POLL" _ <> "$TICK"; }

# both back-ends boot the same initramfs: the upcall server is loaded on QEMU too (where nothing calls it)
if [ -f /lab/kata_upcall_srv.ko ]; then
    insmod /lab/kata_upcall_srv.ko
    echo "HPB-INSMOD $?"
fi
# the boot's own kernel warnings (kata-vmm's PMU probe) are not the hot-plug's: count from here on
BOOT_LINES=$(dmesg | wc -l)

disk_usable() {
    [ -e "$SYS/block/vda/size" ] || return 1
    read -r sectors < "$SYS/block/vda/size"
    [ "${sectors:-0}" -gt 0 ] && dd if="$DEV/vda" of=/dev/null bs=512 count=1 2>/dev/null
}
disk_gone() { [ ! -e "$SYS/block/vda" ]; }
cpu_usable() {
    [ -e "$CPU/cpu1/online" ] || return 1
    read -r on < "$CPU/cpu1/online"
    if [ "$on" != 1 ]; then
        # QEMU's ACPI hot-add leaves the new CPU offline (Kata's agent onlines it); upcall's AddCpu onlines
        # it itself, and a write racing with that finds it online
        echo 1 > "$CPU/cpu1/online" 2>/dev/null
        return 1
    fi
    read -r mask < "$CPU/online"
    [ "$mask" = 0-1 ]
}
cpu_gone() { [ ! -e "$CPU/cpu1" ]; }

echo "HPB-READY runs=$RUNS poll=$POLL"
seq=1
while [ "$seq" -le "$RUNS" ]; do
    until disk_usable; do tick; done
    echo "HPB disk+ $seq"
    until disk_gone; do tick; done
    echo "HPB disk- $seq"
    seq=$((seq + 1))
done
seq=1
while [ "$seq" -le "$RUNS" ]; do
    until cpu_usable; do tick; done
    read -r mask < "$CPU/online"
    echo "HPB cpu+ $seq $mask"
    until cpu_gone; do tick; done
    read -r mask < "$CPU/online"
    echo "HPB cpu- $seq $mask"
    seq=$((seq + 1))
done
rm -f "$TICK"
dmesg | tail -n "+$((BOOT_LINES + 1))" | grep -E "$OOPS" | sed 's/^/HPB-OOPS-LINE /'
echo "HPB-OOPS $(dmesg | tail -n "+$((BOOT_LINES + 1))" | grep -c -E "$OOPS")"
dmesg | grep -E 'acpiphp|pciehp|kata_upcall_srv|virtio|smpboot|CPU1|ACPI: CPU' | tail -n 12 | sed 's/^/HPB-DMESG /'
echo "HPB-DMESG end"
