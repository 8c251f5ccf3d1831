#!/bin/sh
# lab.run script of lab/tests/test_memory_lab.py: report MemTotal and MemFree (KiB), wait for the host's
# virtio-mem plug (MemTotal grows by 200 MiB or more), then for its balloon (MemTotal falls by all 128 MiB).
kib() { sed -n "s/^$1: *\([0-9]*\) kB/\1/p" /proc/meminfo; }
echo "MEM-DRIVERS $(ls /sys/bus/virtio/drivers | grep -c -E '^virtio_(mem|balloon)$')"
# Each baseline is read once, before the line the host acts on: read again after it, it could already
# count some of the host's next change (then the full 128 MiB drop below never comes).
before=$(kib MemTotal)
echo "MEM-BEFORE $before $(kib MemFree)"
echo MEM-READY
i=0
while [ $(($(kib MemTotal) - before)) -lt 204800 ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
plugged=$(kib MemTotal)
echo "MEM-PLUGGED $plugged $(kib MemFree)"
i=0
while [ $((plugged - $(kib MemTotal))) -lt 131072 ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
echo "MEM-BALLOONED $(kib MemTotal) $(kib MemFree)"
dmesg | grep -E 'BUG:|Oops|general protection' | sed 's/^/MEM-OOPS-LINE /'
echo "MEM-OOPS $(dmesg | grep -c -E 'BUG:|Oops|general protection')"
dmesg | grep -E 'virtio_mem|virtio_balloon' | tail -n 20 | sed 's/^/MEM-DMESG /'
