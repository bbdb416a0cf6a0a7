"""Shared test configuration. The servers come from the esbridge pytest plugin."""
