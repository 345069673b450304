"""`make bench`: Switchboard side by side with a direct call, a bare proxy and LiteLLM."""
