"""The prefill worker process: see service.py."""
