"""What the network takes, shared by inference and training: `preprocess` (the test-time image
transform and batching) and `text` (the tokenizer, prompts, phrase -> token positive maps)."""
