"""Shared fixtures. Kernel tests need root (CI runs as root) and build real labs with unique names;
every lab a test builds is torn down by the fixture even when the test fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


HOST_LINKS_AT_START: set[str] = set()
HOST_NFT_TABLES_AT_START: set[str] = set()


def host_links() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}


def host_nft_tables() -> set[str]:
    import json
    import subprocess

    out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True).stdout
    items = json.loads(out or "{}").get("nftables", []) if out.strip() else []
    return {f"{i['table']['family']} {i['table']['name']}" for i in items if "table" in i}


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        HOST_LINKS_AT_START.update(host_links())
        HOST_NFT_TABLES_AT_START.update(host_nft_tables())


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: builds real namespaces (CI runs as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab_name(request):
    """A lab name unique to this test process and test."""
    base = "t" + format(abs(hash(request.node.nodeid)) % 36**4, "x")[:5]
    return f"{base}{os.getpid() % 10000}"


@pytest.fixture
def make_lab():
    """Build labs from specs; all of them are removed afterwards, whatever happened."""
    from labkit import lab as labmod

    built = []

    def make(spec, **kw):
        built.append(spec.name)
        return labmod.up(spec, progress=False, **kw)

    yield make
    for name in reversed(built):
        labmod.down(name)
