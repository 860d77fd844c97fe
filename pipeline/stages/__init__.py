"""The labelling stages, shards in and shards out, on Ray Data through the shared runner
(`stage`): `parse_captions`, `pseudo_label` (teachers from `teachers`, boxes kept by the
policies of `filtering`), `filter_stage`, `decontaminate` (`near_duplicates`), and
`inspect_labels` (show, export, stats of their output). Built on `pipeline.io`; no stage
imports another stage."""
