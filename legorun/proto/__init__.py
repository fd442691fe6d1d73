"""Generated gRPC modules (built from protos/ by setup.py; not committed)."""
