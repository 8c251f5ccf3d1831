"""The Kubernetes CRI messages a shim reads (k8s.io/cri-api runtime v1, trimmed to what it needs).

containerd 2.x's shim sandboxer hands the pod's `PodSandboxConfig` to the shim in
``CreateSandboxRequest.options``; `POD_SANDBOX_CONFIG_TYPE` is that Any's type_url. The message keeps its
upstream package name (``runtime.v1``), so a full CRI API loaded in the same process would clash with it:
extend this one instead of generating a second copy.
"""

from __future__ import annotations

from kata_proto._gen.cri.runtime.v1 import api_pb2 as cri_pb2

__all__ = ["POD_SANDBOX_CONFIG_TYPE", "cri_pb2"]

#: ``CreateSandboxRequest.options.type_url`` when containerd's CRI plugin creates a pod through the shim
#: sandboxer (containerd's typeurl gives a message's bare full name).
POD_SANDBOX_CONFIG_TYPE = cri_pb2.PodSandboxConfig.DESCRIPTOR.full_name
