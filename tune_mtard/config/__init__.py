"""One typed config for runs and searches (docs/configuration.md), parsed and validated once at the edge.

YAML in, dataclasses out; everything inside the package takes a :class:`Config` (or plain values), never
raw dicts. ``schema`` holds the sections and their rules (and builds a Config from a dict and back to
YAML), ``space`` the searched distributions, ``loading`` files and overrides, ``coerce`` the typing of
loose values.
"""

from tune_mtard.config.coerce import AUTO, flatten, parse_number
from tune_mtard.config.loading import (
    absolute_tracking_uri,
    apply_overrides,
    find_config_file,
    from_dict,
    load_config,
    parse_override,
    resolve_paths,
    to_yaml,
)
from tune_mtard.config.schema import Config
from tune_mtard.config.sections import TeacherConfig
from tune_mtard.config.space import Distribution

__all__ = [
    "AUTO", "Config", "Distribution", "TeacherConfig", "absolute_tracking_uri", "apply_overrides",
    "find_config_file", "flatten", "from_dict", "load_config", "parse_number", "parse_override",
    "resolve_paths", "to_yaml",
]
