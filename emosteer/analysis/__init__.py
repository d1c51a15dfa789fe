"""Finding circuits: steering-vector extraction, emotion scoring, fluency guards, causal attribution, and the runner interface over both backends."""
