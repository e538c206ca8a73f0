"""GGUF files read natively: config, tokenizer and tensors from the file, in our families' names.

    gm = open_gguf("model.gguf")        # parses the header; nothing de-quantized
    model = build_model(gm.config, gm)  # sinkstream.loading: one tensor at a time, in its own quantization
    tok = load_tokenizer(gm.tokenizer_folder())

`arch` maps each llama.cpp architecture to our config and names, undoing the converter's reorderings;
`quants` turns each tensor's bytes into a float tensor or a `QuantWeight`.
"""
from .model import GGUFModel, open_gguf

__all__ = ["GGUFModel", "open_gguf"]
