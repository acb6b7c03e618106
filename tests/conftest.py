"""Shared test settings: one hypothesis profile for the whole suite.

Property tests run a modest number of examples with no per-example deadline, so
the full suite stays within its time budget on a 2-core machine while every
property is still exercised on freshly drawn instances.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "project",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("project")
