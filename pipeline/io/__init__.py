"""The files that flow between the stages, and nothing else: one filesystem layer (`storage`:
local paths, s3://, gs://), input shards (`shards`), image decoding (`images`), the stage
outputs (`phrases_file`, `labels_io`) and their per-shard accounting (`shard_report`,
`stage_stats`, `progress`). Imports nothing from the other `pipeline` packages."""
