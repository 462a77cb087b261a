"""``tarfile`` with PEP 706 extraction filters on every Python stockade supports.

CPython added ``filter=``, ``data_filter`` and ``tar_filter`` in 3.11.4; Debian 12 ships 3.11.2,
so there the same module comes from the ``backports.tarfile`` package (a dependency only on
those versions).
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11, 4):
    import tarfile
else:  # pragma: no cover - exercised on Debian 12's python3 (3.11.2)
    from backports import tarfile  # type: ignore[import-not-found,no-redef]

__all__ = ["tarfile"]
