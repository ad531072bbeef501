"""Routing policies, one module per family; importing this package registers them all.

`base` holds the registry (`register_policy`, `make_policy`, `policy_names`) and imports no
policy, so no policy module imports another.
"""

from kvqueue.routing.policies import (  # noqa: F401  (imported to register)
    chwbl,
    dynamo,
    llmd,
    preble,
    predictive,
    seed,
    sglang,
)
from kvqueue.routing.policies.base import (
    POLICIES,
    Policy,
    least_loaded,
    make_policy,
    policy_names,
    register_policy,
)

__all__ = ["POLICIES", "Policy", "least_loaded", "make_policy", "policy_names", "register_policy"]
