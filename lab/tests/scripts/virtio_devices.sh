#!/bin/sh
# lab.run script of lab/tests/test_virtio_lab.py: every kata-vmm virtio device in one boot.
# Expects /dev/vda (read-only), virtio-fs tag "rootfs" at /mnt/rootfs (lab.virtiofs=rootfs), a tap whose
# far end is 10.77.0.1/24, hybrid vsock; /lab/vsock_helper in the initrd
# (initrd-test.img loads virtio-rng itself).
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
echo "VIRTIO-DEVICES $(cat /sys/bus/virtio/devices/*/device | tr '\n' ' ')"

echo "BLK-RO $(cat /sys/block/vda/ro)"
echo "BLK-SHA $(head -c "$(arg lab.blkbytes)" /dev/vda | sha256sum | cut -d' ' -f1)"

echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG-BYTES $(head -c 4096 /dev/hwrng | wc -c)"

(cd /mnt/rootfs && find . -exec stat -c 'FS-ENTRY %n %f %s' {} \;)
echo "FS-BUSYBOX-SHA $(sha256sum /mnt/rootfs/bin/busybox | cut -d' ' -f1)"
echo "written-by-guest $(arg lab.token)" > /mnt/rootfs/from-guest.txt
echo "FS-WRITE $?"
sync

ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
ping -c 3 -W 10 10.77.0.1
echo "NET-PING $?"

start=$(cut -d' ' -f1 /proc/uptime)
/lab/vsock_helper echo 1024 /tmp/echo.bin
echo "VSOCK-ECHO $? $start $(cut -d' ' -f1 /proc/uptime)"
echo "VSOCK-SHA $(sha256sum /tmp/echo.bin | cut -d' ' -f1) $(wc -c < /tmp/echo.bin)"
rm -f /tmp/echo.bin
echo "VSOCK-GUEST-REPLY $(echo ping-from-guest | /lab/vsock_helper send 2 5000)"
echo VIRTIO-SCRIPT-DONE
