"""The one exception type for bad input data."""


class DataError(ValueError):
    """A problem with a dataset on disk or with a data configuration.

    The message always names the file, clip, class or config key at fault.
    """
