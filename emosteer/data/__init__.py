"""Counterfactual pair datasets: the JSONL format, the built-in text set, synthetic and
folder-based image pairs, and seeded splitting."""
from emosteer.data.format import (Pair, PairFormatError, Prompt, Stimulus, iter_pairs,
                                  parse_pair, parse_prompt, read_pairs, read_prompts,
                                  write_pairs, write_prompts)
from emosteer.data.builtin import (BUILTIN_EMOTIONS, DEFAULT_QUERY, DEV_TEMPLATES,
                                   TEMPLATED_PER_TEMPLATE, TEMPLATES,
                                   TEST_TEMPLATES, generate_heldout, generate_pairs,
                                   generate_templated, load_builtin, load_heldout,
                                   load_templated, write_builtin)
from emosteer.data.images import (IMAGE_QUERY, build_synthetic_pairs, load_image_folder,
                                  random_scene, render_scene)
from emosteer.data.split import sample_pairs, split_pairs

__all__ = [
    "Pair", "PairFormatError", "Prompt", "Stimulus", "iter_pairs", "parse_pair",
    "parse_prompt", "read_pairs", "read_prompts", "write_pairs", "write_prompts",
    "BUILTIN_EMOTIONS", "DEFAULT_QUERY", "generate_heldout", "generate_pairs",
    "load_builtin", "load_heldout", "write_builtin", "IMAGE_QUERY", "TEMPLATES", "TEMPLATED_PER_TEMPLATE",
    "DEV_TEMPLATES", "TEST_TEMPLATES", "generate_templated", "load_templated",
    "build_synthetic_pairs", "load_image_folder", "random_scene", "render_scene",
    "sample_pairs", "split_pairs",
]
