"""Runs last (file order): whatever the tests before built must be gone. A leak here is a bug in a
teardown, and this is the test that fails on it."""

from __future__ import annotations

import os

import pytest
from conftest import HOST_LINKS_AT_START, HOST_NFT_TABLES_AT_START, host_links, host_nft_tables

from labkit import nsexec
from labkit.state import list_labs

pytestmark = pytest.mark.root
TEST_PREFIXES = ("lktest", "lkdoc-", "lk-t")  # names tests and doctor probes use


def test_no_namespace_left_by_tests():
    assert [n for n in nsexec.list_netns() if n.startswith(TEST_PREFIXES)] == []


def test_no_lab_state_or_cgroup_left_by_tests():
    assert [n for n in list_labs() if n.startswith("t")] == []
    root = nsexec.cgroup2_root()
    if root:
        assert [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(TEST_PREFIXES)] == []


def test_no_lab_mount_left():
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f]
    assert [m for m in mounts if m.startswith("/run/labkit/t")] == []


def test_no_link_added_to_the_host_namespace():
    """Labs never add links to the host (VM labs add libvirt bridges and taps, and remove them)."""
    assert host_links() - HOST_LINKS_AT_START == set()


def test_no_table_added_to_the_host_namespace():
    """Datapaths live in node namespaces; libvirt's iptables calls (VM labs) create host tables that
    the vagrant backend must remove again."""
    assert host_nft_tables() - HOST_NFT_TABLES_AT_START == set()


def test_no_lab_process_left():
    inodes = [nsexec.netns_inode(n) for n in nsexec.list_netns() if n.startswith(TEST_PREFIXES)]
    assert nsexec.pids_in_netns(i for i in inodes if i) == []
    assert os.getpid() > 0
