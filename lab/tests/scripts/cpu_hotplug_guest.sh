#!/bin/sh
# lab.run script of lab/tests/test_upcall_lab.py's vCPU hot-plug test: load the upcall server, report the
# online CPUs, wait for the host's hot-added vCPU, then for its removal. Expects /lab/kata_upcall_srv.ko.
insmod /lab/kata_upcall_srv.ko
echo "CPU-INSMOD $?"
echo "CPU-BEFORE $(cat /sys/devices/system/cpu/online) possible $(cat /sys/devices/system/cpu/possible)"
echo CPU-READY
i=0
while [ "$(cat /sys/devices/system/cpu/online)" = 0 ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
echo "CPU-ADDED $(cat /sys/devices/system/cpu/online) nproc $(grep -c ^processor /proc/cpuinfo)"
i=0
while [ "$(cat /sys/devices/system/cpu/online)" != 0 ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
echo "CPU-REMOVED $(cat /sys/devices/system/cpu/online) nproc $(grep -c ^processor /proc/cpuinfo)"
# only what the kernel logged once the module was loaded: the boot before it has the VMM's known
# warnings (the PMU probe's unchecked WRMSR with its call trace), which are not the module's
dmesg | sed -n '/kata_upcall_srv: listening/,$p' | grep -E 'BUG:|Oops|WARNING:|general protection|Call Trace' \
    | sed 's/^/CPU-OOPS-LINE /'
echo "CPU-OOPS $(dmesg | sed -n '/kata_upcall_srv: listening/,$p' | grep -c -E 'BUG:|Oops|WARNING:|general protection|Call Trace')"
dmesg | grep -E 'kata_upcall_srv|smpboot|CPU' | tail -n 20 | sed 's/^/CPU-DMESG /'
