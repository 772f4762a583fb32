"""Reliability suite: one test (or more) per hostile-input finding; each failed on the code before its fix."""
