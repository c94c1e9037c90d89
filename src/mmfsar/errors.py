"""mmfsar's exceptions: every message names the file, clip, class or config key at fault.

``MmfsarError`` is the root, so a caller can catch all of them; ``DataError`` is bad input data
(a dataset on disk, an episode file), ``ConfigError`` a configuration or model mistake (a key that
does not fit, exported files that do not go together). Both are ``ValueError`` subclasses too.
"""


class MmfsarError(Exception):
    """Root of mmfsar's exceptions."""


class DataError(MmfsarError, ValueError):
    """A problem with a dataset on disk, its annotations or the episodes drawn from it."""


class ConfigError(MmfsarError, ValueError):
    """A configuration value or a combination of models / exported files that cannot work."""
