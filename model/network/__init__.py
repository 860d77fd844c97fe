"""The GLIP network, one module per part in the paper's order: `swin` (the visual backbone; `mobilenet`
for the small variants), `fpn` (P3-P7, with DropBlock in training), `language` (BERT), `fusion`
(the X-MHA bi-attention and the extra BERT layers), `dyhead` (the tower and the dot-product
grounding head), with `anchors` and `box_coder` (ATSS). `glip.GLIP` composes them."""
