"""Training the student: `data` (sources, pseudo stream, mixing, loader), `config` (the nested
configuration, one source of defaults), `loop` (the per-worker trainer), `checkpoints` and
`student` (the `pipeline train-student` verb on Ray Train). Built on `pipeline.io` and `model`."""
