"""Rule-based rewards and the code sandbox (imported as r1pipe.rewards)."""
