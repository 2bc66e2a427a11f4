"""The decode worker process: see service.py."""
