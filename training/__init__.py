"""Training and evaluation of Marble's embedded default model: a tool on top of the engine.

`train.py` reproduces `marble.model.default`'s checkpoint from Python sources, `evaluate.py`
measures it through the same `Engine` the server runs, `export.py` writes the serving layout.
Nothing in `model/`, `scheduler/` or `server/` imports this package.
"""
