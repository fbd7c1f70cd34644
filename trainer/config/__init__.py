"""The typed config: `schema` (the dataclasses, the documentation of every key), `loader` (YAML, presets,
`base:`, `--set`, validation) and `presets/*.yaml`."""
