"""Training the student: `data` (sources, pseudo stream, mixing, loader), `config` (the nested
configuration, one source of defaults), `loop` (the per-worker trainer), `checkpoints`,
`driver` (a run on Ray Train) and `student` (the `pipeline train-student` verb). Built on
`pipeline.io` and `model`."""
