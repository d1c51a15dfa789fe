"""Counterfactual pair datasets: the JSONL format, the built-in text set, synthetic and
folder-based image pairs, and seeded splitting."""
from emosteer.data.format import (Pair, PairFormatError, Prompt, Stimulus, iter_pairs,
                                  parse_pair, parse_prompt, read_pairs, read_prompts,
                                  write_pairs, write_prompts)
from emosteer.data.builtin import (BUILTIN_EMOTIONS, DEFAULT_QUERY, generate_heldout,
                                   generate_pairs, load_builtin, load_heldout,
                                   write_builtin)

__all__ = [
    "Pair", "PairFormatError", "Prompt", "Stimulus", "iter_pairs", "parse_pair",
    "parse_prompt", "read_pairs", "read_prompts", "write_pairs", "write_prompts",
    "BUILTIN_EMOTIONS", "DEFAULT_QUERY", "generate_heldout", "generate_pairs",
    "load_builtin", "load_heldout", "write_builtin",
]
