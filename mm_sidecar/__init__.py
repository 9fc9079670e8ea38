"""The composition root: the one package that knows both the sidecar and the reference engine.

The package rule is `sidecar -> preprocess <- engine`: the sidecar never imports the engine, so it
runs in front of any engine. The commands that start an engine or build a model, and `run`, which
starts both and supervises the engine, live here.
"""
