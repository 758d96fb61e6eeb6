"""End to end: user.* extended attributes, sealed in S3 metadata, with POSIX errno semantics."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ssefs.seaweed import SeaweedEndpoint

from .conftest import Mount, sse_params, write_config

pytestmark = pytest.mark.fuse

MountFactory = Callable[..., Mount]


def test_xattrs_round_trip_sealed_and_persisted(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    sse = sse_params(key_bytes)
    s3.put_object(Bucket=bucket, Key="doc.txt", Body=b"document", Metadata={"mode": str(0o100640)}, **sse)
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, cache_extra="writeback_delay = 600"))
    root = mount.mountpoint
    doc = root / "doc.txt"
    os.setxattr(doc, "user.origin", b"secret-origin-value")
    os.setxattr(doc, "user.tag", b"\x00binary\xff")
    assert os.getxattr(doc, "user.origin") == b"secret-origin-value"
    assert sorted(os.listxattr(doc)) == ["user.origin", "user.tag"]
    with pytest.raises(OSError) as caught:
        os.setxattr(doc, "user.origin", b"again", os.XATTR_CREATE)
    assert caught.value.errno == errno.EEXIST
    with pytest.raises(OSError) as caught:
        os.setxattr(doc, "user.absent", b"x", os.XATTR_REPLACE)
    assert caught.value.errno == errno.ENODATA
    os.setxattr(doc, "user.tag", b"replaced", os.XATTR_REPLACE)
    with pytest.raises(OSError) as caught:
        os.getxattr(doc, "user.absent")
    assert caught.value.errno == errno.ENODATA
    with pytest.raises(OSError) as caught:
        os.setxattr(doc, "trusted.other", b"x")
    assert caught.value.errno in (errno.ENOTSUP, errno.EPERM)
    # Namespaces never stored are unsupported, not empty: ls -l then stops asking for ACLs and labels.
    for unsupported in ("system.posix_acl_access", "security.selinux", "trusted.other"):
        with pytest.raises(OSError) as caught:
            os.getxattr(doc, unsupported)
        assert caught.value.errno == errno.ENOTSUP, unsupported
    with pytest.raises(OSError) as caught:
        os.setxattr(doc, "user.big", b"v" * 3000)
    assert caught.value.errno == errno.E2BIG
    os.removexattr(doc, "user.tag")
    with pytest.raises(OSError) as caught:
        os.removexattr(doc, "user.tag")
    assert caught.value.errno == errno.ENODATA

    # In S3: the data and the mode are unchanged, and neither names nor values are readable.
    head = s3.head_object(Bucket=bucket, Key="doc.txt", **sse)
    assert head["Metadata"]["mode"] == str(0o100640)
    stored = " ".join(f"{name}={value}" for name, value in head["Metadata"].items())
    assert "ssefs-xattrs" in stored
    for clear in ("origin", "secret-origin-value", "user."):
        assert clear not in stored
    assert bytes(s3.get_object(Bucket=bucket, Key="doc.txt", **sse)["Body"].read()) == b"document"

    # A file not uploaded yet takes its xattrs along with its first upload.
    fresh_file = root / "new.txt"
    fresh_file.write_bytes(b"new")
    os.setxattr(fresh_file, "user.state", b"draft")
    mount.stop()
    again = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file, name="again")).mountpoint
    assert os.getxattr(again / "doc.txt", "user.origin") == b"secret-origin-value"
    assert os.listxattr(again / "doc.txt") == ["user.origin"]
    assert os.getxattr(again / "new.txt", "user.state") == b"draft"
    assert os.stat(again / "doc.txt").st_mode & 0o7777 == 0o640
    # Renames carry them.
    os.rename(again / "new.txt", again / "renamed.txt")
    assert os.getxattr(again / "renamed.txt", "user.state") == b"draft"
    # The attr tools see the same.
    subprocess.run(["setfattr", "-n", "user.tool", "-v", "set by setfattr", str(again / "renamed.txt")], check=True)
    dumped = subprocess.run(["getfattr", "-d", str(again / "renamed.txt")], capture_output=True, text=True,
                            check=True).stdout
    assert 'user.state="draft"' in dumped and 'user.tool="set by setfattr"' in dumped
    subprocess.run(["setfattr", "-x", "user.state", str(again / "renamed.txt")], check=True)
    assert os.listxattr(again / "renamed.txt") == ["user.tool"]


def test_ls_l_asks_for_acls_and_labels_once_per_mount_not_per_file(
    endpoint: SeaweedEndpoint, bucket: str, key_file: Path, key_bytes: bytes, s3: Any, tmp_path: Path,
    mount_ssefs: MountFactory,
) -> None:
    """`ls -l` asks each file for its ACL and SELinux label unless the filesystem says it has none of either."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    for index in range(20):
        s3.put_object(Bucket=bucket, Key=f"many/f{index:02d}", Body=b"x", **sse_params(key_bytes))
    mount = mount_ssefs(write_config(tmp_path, endpoint, bucket, key_file))
    traced = subprocess.run(
        ["strace", "-f", "-e", "trace=getxattr,lgetxattr", "ls", "-l", str(mount.mountpoint / "many")],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert traced.stdout.count("\n") == 21  # "total" and 20 files
    asked = [line for line in traced.stderr.splitlines() if "getxattr(" in line]
    assert asked and all("ENOTSUP" in line or "EOPNOTSUPP" in line for line in asked), asked
    assert len(asked) <= 4, "\n".join(asked)
