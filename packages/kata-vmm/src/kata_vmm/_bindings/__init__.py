"""ctypes mirrors of the kernel's userspace ABI: one module per header."""
