"""The shipped search spaces (one YAML file per method, plus `demo`).

Installed as the package `ray_unlearn.search_spaces` (see pyproject.toml), so that a wheel carries
them; `ray_unlearn.search_space.load_space` reads them from there.
"""
