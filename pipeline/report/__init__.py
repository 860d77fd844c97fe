"""`pipeline report` and the HTML pieces every report is made of (the demo's too): `page`
(the page shell and tables), `figures` (matplotlib charts as embedded PNGs), one module per kind
of section (`shard_stage`, `labels`, `training`), and the verb (`command`)."""
