"""Model zoo: published configurations of the models partitioner is benchmarked on.

`zoo.get(name, **overrides)`, `zoo.names()`, `zoo.example_inputs(name, batch=..., device=...)`.
Every family has a `<family>-tiny` preset for tests; all models build on the meta device.
"""

# Importing a family module registers its presets (import order = registry order).
from zoo import bert, dmagaze, gpt3, llama, metaslot, ncf  # noqa: F401
from zoo.registry import ModelEntry, entry, example_inputs, example_targets, get, loss_fn, names, register

__all__ = ["ModelEntry", "entry", "example_inputs", "example_targets", "get", "loss_fn", "names", "register"]
