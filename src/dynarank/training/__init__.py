"""The training layer: one loop for every method (dynarank's and the stock baselines), data, tasks, models."""
