"""Generated gRPC code for gptjt (regenerate with `python proto/generate.py`; never edit by hand)."""
