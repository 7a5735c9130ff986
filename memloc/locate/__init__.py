"""Where is memorization stored?

- :func:`rewind_layers`: put one layer back to an earlier checkpoint; does memorization survive?
- :func:`retrain_layers`: reset one layer, freeze the rest, retrain on clean examples; does it come back?
- :func:`greedy_flip` / :func:`ablate_examples`: how many units must be zeroed to flip an example?
- :func:`dropout_accuracies`: example-tied dropout, memorization units kept or dropped.

- :mod:`.localize`: one interface for localizers (HardConcrete, Slimming, Zero-Out, IG, activations, greedy);
  :mod:`.groundtruth`: the INJ and DEL benchmarks that score them (Chang et al. 2024).
- :mod:`.knowledge` and :mod:`.trace`: knowledge neurons and causal tracing for language models.
"""
from .ablate import ablate_examples, find_units, greedy_flip, summarize_flips
from .dropout import dropout_accuracies
from .retrain import retrain_layer, retrain_layers
from .rewind import default_rewind_epochs, rewind_layers

__all__ = ["ablate_examples", "find_units", "greedy_flip", "summarize_flips", "dropout_accuracies", "retrain_layer",
           "retrain_layers", "default_rewind_epochs", "rewind_layers"]
