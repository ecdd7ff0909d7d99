"""Experiment grids: run specs with stable keys, a resumable SQLite result store, executors and reports."""
