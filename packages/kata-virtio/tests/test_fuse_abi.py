"""Our FUSE and virtio structs have the sizes of the kernel's (include/uapi/linux/fuse.h, virtio_*.h)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kata_virtio import _fuse as F

SIZES = {
    "fuse_in_header": F.FUSE_IN_HEADER.size,
    "fuse_out_header": F.FUSE_OUT_HEADER.size,
    "fuse_attr": F.FUSE_ATTR.size,
    "fuse_entry_out": F.FUSE_ENTRY_OUT_SIZE,
    "fuse_attr_out": F.FUSE_ATTR_OUT_HEAD.size + F.FUSE_ATTR.size,
    "fuse_forget_in": F.FUSE_FORGET_IN.size,
    "fuse_batch_forget_in": F.FUSE_BATCH_FORGET_IN.size,
    "fuse_forget_one": F.FUSE_FORGET_ONE.size,
    "fuse_getattr_in": F.FUSE_GETATTR_IN.size,
    "fuse_setattr_in": F.FUSE_SETATTR_IN.size,
    "fuse_mknod_in": F.FUSE_MKNOD_IN.size,
    "fuse_mkdir_in": F.FUSE_MKDIR_IN.size,
    "fuse_rename_in": F.FUSE_RENAME_IN.size,
    "fuse_rename2_in": F.FUSE_RENAME2_IN.size,
    "fuse_link_in": F.FUSE_LINK_IN.size,
    "fuse_open_in": F.FUSE_OPEN_IN.size,
    "fuse_create_in": F.FUSE_CREATE_IN.size,
    "fuse_open_out": F.FUSE_OPEN_OUT.size,
    "fuse_release_in": F.FUSE_RELEASE_IN.size,
    "fuse_flush_in": F.FUSE_FLUSH_IN.size,
    "fuse_read_in": F.FUSE_READ_IN.size,
    "fuse_write_in": F.FUSE_WRITE_IN.size,
    "fuse_write_out": F.FUSE_WRITE_OUT.size,
    "fuse_statfs_out": F.FUSE_KSTATFS.size,
    "fuse_fsync_in": F.FUSE_FSYNC_IN.size,
    "fuse_getxattr_in": F.FUSE_GETXATTR_IN.size,
    "fuse_getxattr_out": F.FUSE_GETXATTR_OUT.size,
    "fuse_access_in": F.FUSE_ACCESS_IN.size,
    "fuse_init_out": F.FUSE_INIT_OUT.size,
    "fuse_fallocate_in": F.FUSE_FALLOCATE_IN.size,
    "fuse_lseek_in": F.FUSE_LSEEK_IN.size,
    "fuse_lseek_out": F.FUSE_LSEEK_OUT.size,
    "fuse_dirent": F.FUSE_DIRENT_HEAD.size,
    "virtio_vsock_hdr": 44,
    "virtio_net_hdr_v1": 12,
    "virtio_blk_outhdr": 16,
    "virtio_fs_config": 40,
}
#: Pinned independently of the host's headers (fuse.h 7.31+ on x86-64).
KNOWN = {
    "fuse_in_header": 40,
    "fuse_attr": 88,
    "fuse_entry_out": 128,
    "fuse_setattr_in": 88,
    "fuse_init_out": 64,
}


def test_pinned_sizes() -> None:
    for name, size in KNOWN.items():
        assert SIZES[name] == size, name
    assert F.FUSE_SETXATTR_IN.size == 8  # FUSE_COMPAT_SETXATTR_IN_SIZE: we never offer FUSE_SETXATTR_EXT
    assert F.FUSE_INIT_IN.size == 16  # the 7.36 tail (flags2, unused) is optional on input


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler and linux-libc-dev headers")
def test_sizes_match_the_kernel_headers(tmp_path: Path) -> None:
    lines = [f'printf("{n} %zu\\n", sizeof(struct {n}));' for n in SIZES]
    src = tmp_path / "sizes.c"
    src.write_text(
        "#include <stdio.h>\n#include <linux/fuse.h>\n#include <linux/virtio_vsock.h>\n"
        "#include <linux/virtio_net.h>\n#include <linux/virtio_blk.h>\n#include <linux/virtio_fs.h>\n"
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    subprocess.run(["cc", "-o", str(tmp_path / "sizes"), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "sizes")], check=True, capture_output=True, text=True).stdout
    kernel = {n: int(v) for n, v in (line.split() for line in out.splitlines())}
    assert kernel == SIZES
