"""Where is memorization stored? Layer rewinding and retraining, greedy neuron ablation, example-tied dropout,
knowledge neurons and causal tracing (issues 3 and 6)."""
