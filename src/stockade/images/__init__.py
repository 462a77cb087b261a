"""Images for the image-based backends (microVM, gVisor, containers), built locally.

``ensure_rootfs`` builds (or finds in the cache) a Debian root filesystem with Python 3 and
a profile's packages; VM kernels, initramfs and erofs images build on it.
"""

from stockade.images.rootfs import (
    PROFILES,
    ImageBuildError,
    ImageProfile,
    RootfsImage,
    ensure_rootfs,
    find_rootfs,
    image_cache_dir,
    rootfs_recipe,
)

__all__ = [
    "PROFILES",
    "ImageBuildError",
    "ImageProfile",
    "RootfsImage",
    "ensure_rootfs",
    "find_rootfs",
    "image_cache_dir",
    "rootfs_recipe",
]
