"""Shared plumbing: one config loader, one atomic writer, one way to start Ray."""
