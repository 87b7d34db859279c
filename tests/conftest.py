"""Test-wide set-up: structured logs go to stderr at warning level, so test output stays readable."""

from linectl.logging import setup_logging

setup_logging("warning")
