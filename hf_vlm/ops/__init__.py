"""Numerical kernels: a fast pure-PyTorch Mamba selective scan and the backend ladder."""

from .kernels import (
    SCAN_BACKENDS,
    active_scan_backend,
    attach_fast_scan,
    backend_usage,
    install_fast_scan,
    mamba_kernels_available,
    reset_backend_usage,
    scan_ladder_report,
    set_scan_backend,
    set_scan_scope,
    uninstall_fast_scan,
)
from .selective_scan import selective_scan, selective_scan_ref

__all__ = [
    "SCAN_BACKENDS",
    "active_scan_backend",
    "attach_fast_scan",
    "backend_usage",
    "install_fast_scan",
    "mamba_kernels_available",
    "reset_backend_usage",
    "scan_ladder_report",
    "selective_scan",
    "selective_scan_ref",
    "set_scan_backend",
    "set_scan_scope",
    "uninstall_fast_scan",
]
