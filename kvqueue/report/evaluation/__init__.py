"""The policy evaluation suite: every registered policy on a fixed set of workloads, simulated."""
