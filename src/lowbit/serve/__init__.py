"""Deployment of GGUF files: an OpenAI-compatible server (llama-cpp-python) and Ollama Modelfiles."""

from lowbit.serve.llamacpp import ChatInfo, ServeConfig, check_gguf_file, read_chat_info, serve
from lowbit.serve.ollama import OllamaExport, export_ollama

__all__ = ["ChatInfo", "OllamaExport", "ServeConfig", "check_gguf_file", "export_ollama", "read_chat_info", "serve"]
