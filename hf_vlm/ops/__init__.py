"""Numerical kernels: a fast pure-PyTorch Mamba selective scan and backend selection."""

from .kernels import active_scan_backend, install_fast_scan, mamba_kernels_available, uninstall_fast_scan
from .selective_scan import selective_scan, selective_scan_ref

__all__ = [
    "active_scan_backend",
    "install_fast_scan",
    "mamba_kernels_available",
    "selective_scan",
    "selective_scan_ref",
    "uninstall_fast_scan",
]
