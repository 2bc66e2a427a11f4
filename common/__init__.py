"""Torch-free pieces shared by every component: config, errors, sampling, tokenizer, block hashing."""
