"""Reports: metrics, dashboards, plots, and studies made of many runs (the policy evaluation)."""
