"""twinlm."""
