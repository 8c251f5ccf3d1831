#!/bin/sh
# lab.run script of lab/bench/virtio_guest.py: one timed sequential read of all of /dev/vda (to
# /dev/null, so the guest's CPU does not bound it), then a checksum, which reads from the page cache.
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
sum=$(md5sum /dev/vda | cut -d' ' -f1)
echo "BLK-READ $(cat /sys/block/vda/size) $t0 $t1 $sum"
