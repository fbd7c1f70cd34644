"""What runs with no download: the built-in character tokenizer and the generated instruction tasks."""
