"""Process-level CPU settings."""

from __future__ import annotations

import sys

import pytest

from shraygpt_rl.runtime import retain_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_memory_takes_and_is_idempotent():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True
