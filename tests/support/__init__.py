"""Helpers the tests share: private jobs of daemons and trainers, local clusters, loss files."""
