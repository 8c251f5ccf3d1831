#!/bin/sh
# lab.run script of lab/tests/test_upcall_lab.py's hot-plug test: load the upcall server, wait for the disk
# the host hot-adds (/dev/vda: this guest boots with no disk), print its checksum, wait until the host has
# removed it again. Expects /lab/kata_upcall_srv.ko.
insmod /lab/kata_upcall_srv.ko
echo "HOT-INSMOD $?"
echo HOT-READY
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
echo "HOT-VDA $(head -c 65536 /dev/vda | sha256sum | cut -d' ' -f1) ro=$(cat /sys/block/vda/ro)"
i=0
while [ -b /dev/vda ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
echo "HOT-GONE $([ -b /dev/vda ] && echo no || echo yes)"
echo "HOT-MMIO-LEFT $(ls /sys/bus/platform/devices | grep -c '^virtio-mmio\..*auto$')"
# only what the kernel logged once the module was loaded: the boot before it has the VMM's known
# warnings (the PMU probe's unchecked WRMSR with its call trace), which are not the module's
dmesg | sed -n '/kata_upcall_srv: listening/,$p' | grep -E 'BUG:|Oops|WARNING:|general protection|Call Trace' \
    | sed 's/^/HOT-OOPS-LINE /'
echo "HOT-OOPS $(dmesg | sed -n '/kata_upcall_srv: listening/,$p' | grep -c -E 'BUG:|Oops|WARNING:|general protection|Call Trace')"
dmesg | grep -E 'kata_upcall_srv|virtio' | tail -n 20 | sed 's/^/HOT-DMESG /'
