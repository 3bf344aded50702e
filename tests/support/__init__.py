"""Plain helpers of the suite: builders of inputs on disk and ways to run the CLI.

Nothing here is a fixture (those are in :mod:`tests.plugins`); test modules import what
they use by name. The shared pieces: :mod:`tests.support.tiny_llama` (the one tiny
Llama builder) and :mod:`tests.support.safetensors_files` (the one hand-made
safetensors writer, hostile framings included).
"""
