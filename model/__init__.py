"""GLIP in current PyTorch, grouped by what a reader comes for:

- `config`: the variants, one small typed dataclass per part and one preset per variant;
- `network`: the GLIP network in the paper's order (`glip` composes it): `swin` (or `mobilenet`),
  `fpn`, `language` (BERT), `fusion`, `dyhead`, with `anchors` and `box_coder`;
- `inputs`: what the network takes, for inference and training alike: `preprocess` (the image
  transform and batching) and `text` (tokenizer, prompts, phrase -> token positive maps);
- `inference`: head outputs -> boxes: `postprocess`, `nms`, and `predict` (`GLIPPredictor`, the
  GLIP teacher: images + captions + phrase spans -> boxes);
- `training`: `train_targets` (examples -> inputs and targets), `augment`, `loss` and `loss_terms`;
- `weights`: `checkpoint` (official files in, ours out), `pretrained` (parts from offline
  pretrained files), `parity` (comparison with the official reference runs);
- `teachers`: `teacher` (what every teacher gives the pipeline) and `hf_teachers` (Grounding
  DINO, OWLv2).

`network`, `inputs` and `teachers.teacher` import nothing outside `config`; nothing here imports
`pipeline` or `nlp`."""
