#!/bin/sh
# lab.run script of lab/bench/virtio_guest.py: stat and read every small file under the virtio-fs
# mount once (cold guest caches), timed in the guest.
d=/mnt/rootfs/files
t0=$(cut -d' ' -f1 /proc/uptime)
find "$d" -type f -exec cat {} + > /dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
echo "FS-READ $(find "$d" -type f | wc -l) $(cat "$d"/* | md5sum | cut -d' ' -f1) $t0 $t1"
