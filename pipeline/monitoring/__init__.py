"""Monitoring: the local Prometheus, its scrape targets, and `pipeline status` (issue 16)."""
