"""The one hub check: offline mode and an unreachable endpoint both fail in seconds, with the caller's advice."""

from __future__ import annotations

import time

import pytest

from medlora.core.hub import HubUnavailable, ensure_hub_reachable, hub_offline


def test_offline_variables_fail_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match=r"HF_HUB_OFFLINE=1\)\. do this instead$"):
        ensure_hub_reachable("do this instead")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert not hub_offline() and hub_offline(datasets=True)
    with pytest.raises(HubUnavailable, match=r"HF_DATASETS_OFFLINE=1"):
        ensure_hub_reachable("advice", datasets=True)


def test_unreachable_endpoint_fails_fast_without_offline_flag(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    started = time.perf_counter()
    with pytest.raises(HubUnavailable, match=r"cannot reach the Hugging Face hub at 127\.0\.0\.1:9 .*advice"):
        ensure_hub_reachable("advice", timeout=2)
    assert time.perf_counter() - started < 5
