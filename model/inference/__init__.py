"""Head outputs -> boxes: `postprocess` (the official ATSS post-processor), `nms` (its
multi-label NMS), and `predict` (`GLIPPredictor`, the GLIP teacher: images + captions + phrase
spans -> boxes in original pixels)."""
