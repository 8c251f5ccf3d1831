"""test_cni_lab's two pods on a CNI bridge over the external back-end (issue 15: "the pod and CNI tests pass
on QEMU too").

The same test as test_cni_lab.py (imported: one copy), run against test_shim_qemu_lab's containerd, whose
shims read upstream's configuration-qemu-runtime-rs.toml: each pod's tap is handed to QEMU's virtio-net-pci
(vhost=on) instead of kata-vmm's virtio-net, the tcfilter between the CNI veth and the tap is the same. A file
of its own, so `nox -s lab` runs it in its own lab VM beside test_cni_lab.py; its containerd fixture checks
after the module that no QEMU or virtiofsd is left.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_cni_lab
import test_shim_qemu_lab

ctrd = test_shim_qemu_lab.ctrd
cni = test_cni_lab.cni
host_http = test_cni_lab.host_http
test_two_pods_on_a_cni_bridge_talk_http_both_ways_and_leave_nothing = (
    test_cni_lab.test_two_pods_on_a_cni_bridge_talk_http_both_ways_and_leave_nothing
)
