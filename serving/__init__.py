"""serving: the scoring agent that hot-swaps published weights."""
