"""What a model or a set of pseudo-labels is worth against gold annotations: `evaluate`
(`pipeline eval`: COCO AP), `calibrate` (a filter policy chosen on a labelled sample) and
`ground` (one image through a teacher, to look at). Built on `pipeline.stages.teachers`,
`pipeline.train.data` (reading pseudo shards) and `pipeline.io`."""
