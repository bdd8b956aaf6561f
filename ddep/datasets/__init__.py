"""Dataset builders and their specs.

Kept import-light on purpose: `ddep.datasets.specs.get(name)` imports the one
builder module that registers `name`, so TF is loaded only when a dataset is used.
"""
