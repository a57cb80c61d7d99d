"""Test-only helpers shared by the qkv test suite."""
