"""The bundled files are the byte-for-byte copies that docs/data.md lists."""
import hashlib
import os
import re

from conftest import REPO

ASSETS = os.path.join(REPO, "ava_jax", "assets")


def test_bundled_checksums():
    text = open(os.path.join(REPO, "docs", "data.md"), encoding="utf-8").read()
    sums = re.findall(r"^([0-9a-f]{64})  (\S+)$", text, flags=re.M)
    assert len(sums) == 8
    for digest, rel in sums:
        with open(os.path.join(ASSETS, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, rel
