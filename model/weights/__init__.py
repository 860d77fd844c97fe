"""Weights in and out: `checkpoint` (load the official releases, save ours in their layout, with
metadata), `pretrained` (parts of a GLIP built from scratch, from offline pretrained files) and
`parity` (a model against the official reference runs)."""
