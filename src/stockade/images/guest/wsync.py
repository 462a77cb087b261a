"""Pack the guest's workspace upper layer as a tar for the host (stdlib only, run in the VM).

``python3 -S -I wsync.py UPPER OUT [LOWER MERGED]``: regular files, directories and symlinks
as they are; overlay whiteouts (character devices 0/0) as character-device members; opaque
directories with the pax record ``STOCKADE.opaque=y``. An unprivileged packer cannot read
``trusted.overlay.opaque``, so with LOWER and MERGED it infers it: an upper directory is
opaque when a name of its lower counterpart is missing from the merged view without a
whiteout hiding it (where no such name exists, opaque or not reads the same in a diff).
Everything else (fifos, sockets, other devices) is left out, as the namespace backend's
diff ignores it.
The host validates every member again: this program runs in the untrusted guest.
"""

from __future__ import annotations

import os
import stat
import sys
import tarfile


def _opaque(path: str, rel: str, lower: str | None, merged: str | None) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    if lower is None or merged is None:
        return False
    lower_dir = os.path.join(lower, rel)
    if os.path.islink(lower_dir) or not os.path.isdir(lower_dir):
        return False
    try:
        hidden = set(os.listdir(lower_dir)) - set(os.listdir(os.path.join(merged, rel)))
        return bool(hidden - set(os.listdir(path)))
    except OSError:
        return False


def pack(upper: str, out: str, lower: str | None = None, merged: str | None = None) -> int:
    count = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(upper):
            dirs.sort()
            rel_top = os.path.relpath(top, upper)
            for name in sorted(dirs) + sorted(files):
                path = os.path.join(top, name)
                rel = name if rel_top == "." else f"{rel_top}/{name}"
                st = os.lstat(path)
                info = tarfile.TarInfo(rel)
                info.mode = stat.S_IMODE(st.st_mode)
                info.mtime = int(st.st_mtime)
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    if _opaque(path, rel, lower, merged):
                        info.pax_headers = {"STOCKADE.opaque": "y"}
                    tar.addfile(info)
                elif stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    info.size = st.st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    info.type = tarfile.CHRTYPE
                    info.devmajor = info.devminor = 0
                    tar.addfile(info)
                else:
                    continue
                count += 1
    return count


if __name__ == "__main__":
    print(pack(*sys.argv[1:5]))
