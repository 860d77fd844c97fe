"""Teachers: `teacher` (what every teacher gives the pipeline: `Detections`, `TeacherIdentity`,
the `Teacher` protocol) and `hf_teachers` (Grounding DINO and OWLv2 through transformers). The
GLIP teacher is `model.inference.predict.GLIPPredictor`."""
