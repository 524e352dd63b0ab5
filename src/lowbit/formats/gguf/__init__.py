"""GGUF files: llama.cpp block quantizers (``encode.quantize_rows``) and the writer."""
