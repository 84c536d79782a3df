"""memscope-async."""
