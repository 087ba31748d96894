"""`gptjt`: the umbrella command."""
