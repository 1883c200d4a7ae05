"""GETER: graph-conditioned explainable temporal reasoning. A temporal knowledge-graph encoder's embedding of a
query and its history becomes one soft prefix token of the LM, which is fine-tuned to answer yes/no/unsure and
explain why (see docs/geter.md)."""
