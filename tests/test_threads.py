"""The thread policy (ffnlib.threads): passive OpenMP waiting unless overridden, FFNLIB_THREADS applied."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ffnlib.errors import ParameterError
from ffnlib.threads import apply_thread_policy, set_wait_policy


def test_passive_waiting_is_set_only_where_nobody_chose():
    env = {}
    assert set_wait_policy(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not set_wait_policy(env) and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {"FFNLIB_THREAD_POLICY": "runtime"}
    assert not set_wait_policy(env) and "OMP_WAIT_POLICY" not in env


@pytest.mark.parametrize("first, expected", [("import ffnlib", "PASSIVE"), ("import torch, ffnlib", "unset")])
def test_import_ffnlib_sets_it_before_torch_loads_the_runtime_and_never_after(first, expected):
    """The OpenMP runtime reads the policy once, when torch loads it: set after that it would only mislead."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "FFNLIB_THREAD_POLICY")}
    out = subprocess.run([sys.executable, "-c", f"{first}; import os; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == expected


def test_ffnlib_threads_sets_torchs_threads_and_refuses_nonsense(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("FFNLIB_THREADS", "2")
        assert apply_thread_policy() == 2 == torch.get_num_threads()
        monkeypatch.setenv("FFNLIB_THREADS", "two")
        with pytest.raises(ParameterError, match="FFNLIB_THREADS must be a positive integer, got 'two'"):
            apply_thread_policy()
    finally:
        torch.set_num_threads(before)
