"""Tiny randomly initialised Grounding DINO and OWLv2 models saved the way users save real ones
(`save_pretrained` of the model and of its processor), for loading back through `--teacher hf:`.

Grounding DINO gets the bert-base-uncased vocabulary that ships offline (`model.inputs.text.load_tokenizer`).
No CLIP vocabulary ships offline, so OWLv2 gets a small byte-level BPE one built here: the 256
byte symbols, their end-of-word forms, a few merges for common caption words, and CLIP's
start/end tokens.
"""

from __future__ import annotations

from pathlib import Path

# Grounding DINO's text limit, small so a long caption takes the chunked path.
GD_MAX_TEXT_LEN = 24
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>"), ("i", "n</w>"), ("a", "n</w>"), ("m", "an</w>")]


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte (bytes outside the kept ranges move above 255)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, moved = [], 0
    for byte in range(256):
        if byte in kept:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


def save_tiny_grounding_dino(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from model.inputs.text import load_tokenizer

    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
            out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, encoder_n_points=2,
        decoder_n_points=2, max_text_len=GD_MAX_TEXT_LEN,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=load_tokenizer(),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_owlv2(folder: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for first, second in _MERGES:
        vocab.setdefault(first + second, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=_MERGES, pad_token="!", model_max_length=16)

    torch.manual_seed(seed)
    config = Owlv2Config(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["!"],
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16
        ),
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(config).eval()
    # transformers initialises the heads with unit-variance weights, which saturates every box
    # to the image edge in a random model; small weights keep boxes on their patches, and a
    # logit shift makes the untrained teacher confident enough for the filter presets.
    with torch.no_grad():
        for head in (model.box_head, model.class_head, model.objectness_head):
            for name, parameter in head.named_parameters():
                if name.endswith("weight"):
                    parameter.normal_(0.0, 0.02)
        model.class_head.logit_shift.bias.fill_(1.0)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
