"""Text translation for POST /translate_to_any: language id, backends, the spec's rules."""
