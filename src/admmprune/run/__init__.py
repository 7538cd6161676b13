"""Recipes, runs and the command line: the schema and its parsing, the run directory, the
pipeline and its runner, stages, training loops, data, finishing steps, reports, LM runs."""
