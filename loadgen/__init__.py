"""The load generator and experiment runner: drives strategies across the tiers and records every request."""
