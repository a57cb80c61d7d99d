"""Shared test settings.

Rules for every test: loopback (127.0.0.1) only, ports chosen free at run
time, every test under pytest-timeout, no assertion on elapsed time except
as a generous upper bound that only a hang could break.

Hypothesis profiles: ``ci`` (default, fast and derandomized so CI is
reproducible) and ``thorough`` (many more examples); pick one with
``QKV_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("QKV_HYPOTHESIS_PROFILE", "ci"))
