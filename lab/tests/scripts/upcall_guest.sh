#!/bin/sh
# lab.run script of lab/tests/test_upcall_lab.py: load the upcall server, wait while the host probes it
# over vsock port 219, then report what is left. Expects /lab/kata_upcall_srv.ko and /lab/vsock_helper.
insmod /lab/kata_upcall_srv.ko
echo "UPCALL-INSMOD $?"
echo "UPCALL-LSMOD $(grep -c '^kata_upcall_srv ' /proc/modules)"
echo "UPCALL-THREAD $(cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^kata-upcall$')"
echo UPCALL-READY
# the host connects to port 1024 when its probes are over
/lab/vsock_helper echo 1024 /tmp/done.bin > /dev/null
echo "UPCALL-LSMOD-AFTER $(grep -c '^kata_upcall_srv ' /proc/modules)"
echo "UPCALL-MMIO-LEFT $(ls /sys/bus/platform/devices | grep -c '^virtio-mmio\..*auto$')"
# only what the kernel logged once the module was loaded: the boot before it has the VMM's known
# warnings (the PMU probe's unchecked WRMSR with its call trace), which are not the module's
dmesg | sed -n '/kata_upcall_srv: listening/,$p' | grep -E 'BUG:|Oops|WARNING:|general protection|Call Trace' \
    | sed 's/^/UPCALL-OOPS-LINE /'
echo "UPCALL-OOPS $(dmesg | sed -n '/kata_upcall_srv: listening/,$p' | grep -c -E 'BUG:|Oops|WARNING:|general protection|Call Trace')"
dmesg | grep 'kata_upcall_srv' | tail -n 40 | sed 's/^/UPCALL-DMESG /'
rmmod kata_upcall_srv
echo "UPCALL-RMMOD $?"
echo "UPCALL-THREAD-AFTER $(cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^kata-upcall$')"
echo UPCALL-SCRIPT-DONE
