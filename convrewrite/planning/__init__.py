"""Plan to a budget: choose the rule, the options and the layers from measured fidelity."""
