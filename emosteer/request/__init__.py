"""What a request asks for: the config (spec), its positions, the vector bank and its file formats, the compiler to slot programs, the slot table."""
