"""The bundle module: files a manifest names are read only from inside the bundle."""

from __future__ import annotations

import json

import pytest

from recsys_moe.bundle import BundleError, bundle_file, read_tables, read_vocabs


def test_paths_outside_the_bundle_are_refused(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "vocab").mkdir(parents=True)
    secret = tmp_path / "secret.parquet"
    secret.write_bytes(b"not yours")
    assert bundle_file(bundle, "vocab/a.parquet") == (bundle / "vocab" / "a.parquet").resolve()
    for bad in ("../secret.parquet", str(secret), "vocab/../../secret.parquet"):
        with pytest.raises(BundleError, match="outside"):
            bundle_file(bundle, bad)
    manifest = {"features": {"categorical": [{"name": "a", "vocab_file": "../secret.parquet"}]}}
    with pytest.raises(BundleError, match=r"'\.\./secret\.parquet' resolves outside"):
        read_vocabs(bundle, manifest)
    # a link inside the bundle that points out of it is refused the same way
    (bundle / "tables").mkdir()
    (bundle / "tables" / "users.parquet").symlink_to(secret)
    with pytest.raises(BundleError, match=r"users\.parquet"):
        read_tables(bundle)
    json.dumps(manifest)  # the manifest itself is plain JSON, never code
