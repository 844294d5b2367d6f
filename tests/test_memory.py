"""The merge CLI's allocator policy (core/memory.py): freed tensor memory is reused, not faulted in afresh."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

_SECOND_ALLOCATION_FAULTS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from mergelab.core.memory import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    torch.empty(1 << 25).fill_(1.0)  # 128 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(1 << 24).fill_(1.0)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _second_allocation(mode: str) -> tuple[str, int]:
    """(what retain_freed_memory returned, page faults of a 64 MB tensor after a 128 MB one was freed) in a fresh
    process."""
    out = subprocess.run([sys.executable, "-c", _SECOND_ALLOCATION_FAULTS, mode], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt; elsewhere it is a no-op")
def test_freed_memory_is_reused_without_page_faults_once_retained():
    applied, retained_faults = _second_allocation("retain")
    _, default_faults = _second_allocation("default")
    assert applied == "True"
    assert default_faults > 10_000  # 16,384 pages of 4 KB faulted in again by default
    assert retained_faults < 1_000


def test_without_glibc_the_policy_is_a_no_op(monkeypatch):
    from mergelab.core import memory

    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.retain_freed_memory() is False
