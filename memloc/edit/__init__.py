"""Changing what was memorized where it lives: rank-one edits, neuron suppression, unlearning (issues 6 and 7)."""
