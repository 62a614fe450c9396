"""The errors of the data sets: each message says what was wrong and what to do."""


class DataError(Exception):
    """A data set cannot be loaded as asked; the message says what was wrong and what to do."""


class DataNotFoundError(DataError):
    """The data set is neither on disk nor fetchable (as opposed to present but wrong)."""
