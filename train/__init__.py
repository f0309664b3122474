"""Radixpert Edge."""
