"""Routing: the prefix index (in memory and in Redis), router state, the router and policies."""
